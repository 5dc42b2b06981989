"""Replay: rebuild a model from its base weights and a pool of (seed, scalar) pairs.

The model a seed pool stands for is ``w = w₀ − lr · Σ_s pool[s] · z_s``. Replayed in
floats, the result would depend on the order and grouping of the additions, so a
client that syncs in several steps would drift from the server bit by bit. fedbits
replays in integers instead: pool scalars are rounded to fixed point
(``pool_fix = round(pool · 2¹⁶)``), directions are integers over 4096, so

    U = Σ_s pool_fix[s] · 4096·z_s          (int64, exact, any order, any split)
    w = float(w₀ − lr · 2⁻²⁸ · U)           (the only rounding, once, in float64)

A :class:`Replay` holds U for the fixed-point pool it has absorbed; moving it to
another pool replays only the seeds whose scalar changed, and the result is
identical to replaying the whole pool from zero. Every pass over the weights
handles all changed seeds at once (each block of U is read and written once).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from fedbits.progress import progress
from fedbits.zo import kernels
from fedbits.zo.generator import TABLE_SCALE, Distribution, param_key

logger = logging.getLogger(__name__)

FIXED_BITS = 16


def to_fixed(pool: np.ndarray) -> np.ndarray:
    """Pool scalars in fixed point (round half to even: identical on every machine)."""
    scaled = np.asarray(pool, dtype=np.float64) * float(1 << FIXED_BITS)
    if not np.all(np.abs(scaled) < 2.0**62):
        raise OverflowError("a pool scalar is too large for exact replay")
    return np.rint(scaled).astype(np.int64)


class SeedKeys:
    """The 64-bit direction key of every (pool seed, parameter name), computed once."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = seeds
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.array([param_key(s, name) for s in self.seeds], dtype=np.uint64)
        return self._cache[name]


class Replay:
    """U (one int64 accumulator per parameter) for the fixed-point pool it holds."""

    def __init__(self, model: nn.Module, keys: SeedKeys, distribution: Distribution) -> None:
        self.keys = keys
        self.distribution = distribution
        self.acc = {
            n: torch.zeros(p.numel(), dtype=torch.int64) for n, p in model.named_parameters()
        }
        self.fix = np.zeros(len(keys.seeds), dtype=np.int64)

    def move_to(self, target_fix: np.ndarray) -> int:
        """Absorb the change to ``target_fix``; return how many seeds were replayed."""
        changed = np.nonzero(target_fix != self.fix)[0]
        if len(changed):
            coefs = target_fix[changed] - self.fix[changed]
            ends = kernels.exact_groups(coefs, self.distribution)
            # a whole pool on a large model (a resumed server, a client far behind) is long
            with progress(f"replaying {len(changed)} seeds", len(self.acc), "tensors",
                          logger=logger) as shown:
                for name, acc in self.acc.items():
                    keys = self.keys(name)[changed]
                    kernels.replay_(keys, coefs, ends, 0, acc, self.distribution)
                    shown.update()
            self.fix = target_fix.copy()
        return len(changed)

    @torch.no_grad()
    def write(self, model: nn.Module, base: dict[str, torch.Tensor], lr: float) -> None:
        """Set every parameter of ``model`` to ``w₀ − lr·2⁻²⁸·U``."""
        scale = lr / float((1 << FIXED_BITS) * TABLE_SCALE)
        for name, p in model.named_parameters():
            kernels.apply(base[name].view(-1), self.acc[name], scale, p.data.view(-1))
