"""Replay: rebuild a model from its base weights and a pool of (seed, scalar) pairs.

The model a seed pool stands for is ``w = w₀ − lr · Σ_s pool[s] · z_s``. Replayed in
floats, the result would depend on the order and grouping of the additions, so a
client that syncs in several steps would drift from the server bit by bit. fedbits
replays in integers instead: pool scalars are rounded to fixed point
(``pool_fix = round(pool · 2¹⁶)``), directions are integers over 4096, so

    U = Σ_s pool_fix[s] · 4096·z_s          (int64, exact, any order, any split)
    w = float(w₀ − lr · 2⁻²⁸ · U)           (the only rounding, once, in float64)

Two ways to hold U, with the same bits:

* :class:`Replay` keeps U (one int64 accumulator per parameter: twice a float32
  model) for the fixed-point pool it has absorbed; moving it to another pool replays
  only the seeds whose scalar changed, and the result is identical to replaying the
  whole pool from zero. Every pass over the weights handles all changed seeds at once
  (each block of U is read and written once). The server, and a client with
  ``client_replay = "incremental"``, sync this way.
* :func:`rebuild` keeps no U: it replays the whole pool tensor by tensor, in flat
  chunks of :data:`REBUILD_CHUNK` elements, into one bounded int64 buffer, and writes
  each chunk of ``w`` as soon as its U is complete (``client_replay = "full"``). Its
  memory beyond the model is that buffer plus the one base tensor being read.

Neither keeps a copy of the base weights: ``w₀`` comes from a lookup by parameter name
(``MethodContext.base_tensor``: the frozen base in memory, or read back from the
checkpoint on disk one tensor at a time), converted to float32 a chunk at a time.
Accumulators live on the parameter's device (the integer replay on a GPU is far faster
than a host round trip of U; the CPU for MPS, which has no float64 for the final step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from fedbits.progress import progress
from fedbits.zo import kernels
from fedbits.zo.generator import TABLE_SCALE, Distribution, param_key

logger = logging.getLogger(__name__)

FIXED_BITS = 16
REBUILD_CHUNK = 1 << 20
"""Elements per chunk of :func:`rebuild` (its int64 buffer: 8 MB) and of every write."""

BaseValues = Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor]
"""The pretrained value of a parameter by name: a lookup (``ctx.base_tensor``) or a dict."""


def accumulator_device(device: torch.device) -> torch.device:
    """Where U for a parameter on ``device`` lives: the same device, except MPS (CPU)."""
    return torch.device("cpu") if device.type == "mps" else device


def _lookup(base: BaseValues) -> Callable[[str], torch.Tensor]:
    return base.__getitem__ if isinstance(base, Mapping) else base


def _scale(lr: float) -> float:
    """lr · 2⁻²⁸: U counts steps of 2⁻¹⁶ (pool) × 2⁻¹² (direction)."""
    return lr / float((1 << FIXED_BITS) * TABLE_SCALE)


def _write_chunk(
    w0: torch.Tensor, acc: torch.Tensor, scale: float, out: torch.Tensor
) -> None:
    """out = w₀ − scale·U for one chunk; a low-precision w₀ becomes float32 here (exact),
    so the compiled kernel takes it."""
    kernels.apply(w0 if w0.dtype == torch.float32 else w0.float(), acc, scale, out)


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
            n: torch.zeros(p.numel(), dtype=torch.int64, device=accumulator_device(p.device))
            for n, p in model.named_parameters()
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
    def write(self, model: nn.Module, base: BaseValues, lr: float) -> None:
        """Set every parameter of ``model`` to ``w₀ − lr·2⁻²⁸·U`` (``w₀`` from ``base``,
        one tensor at a time)."""
        lookup, scale = _lookup(base), _scale(lr)
        for name, p in model.named_parameters():
            w0, acc, out = lookup(name).reshape(-1), self.acc[name], p.data.view(-1)
            for a in range(0, out.numel(), REBUILD_CHUNK):
                b = min(a + REBUILD_CHUNK, out.numel())
                _write_chunk(w0[a:b], acc[a:b], scale, out[a:b])


@torch.no_grad()
def rebuild(
    model: nn.Module, keys: SeedKeys, distribution: Distribution, fix: np.ndarray,
    base: BaseValues, lr: float, chunk: int = REBUILD_CHUNK,
) -> int:
    """Set ``model`` to the model of the fixed-point pool ``fix`` by replaying every
    nonzero seed from ``w₀``, holding U for one chunk of ``chunk`` elements at a time;
    return the seeds replayed. Bit-identical to ``Replay.move_to(fix)`` then
    ``Replay.write`` (U is exact integers, whatever the split), at the memory of one
    chunk instead of twice the model's."""
    lookup, scale = _lookup(base), _scale(lr)
    seeds = np.nonzero(fix)[0]
    coefs = fix[seeds]
    ends = kernels.exact_groups(coefs, distribution)
    params = list(model.named_parameters())
    size = min(chunk, max((p.numel() for _, p in params), default=0))
    buffers: dict[torch.device, torch.Tensor] = {}  # one U chunk per device, reused
    with progress(f"replaying {len(seeds)} seeds", len(params), "tensors",
                  logger=logger) as shown:
        for name, p in params:
            out = p.data.view(-1)
            device = accumulator_device(p.device)
            if device not in buffers:
                buffers[device] = torch.empty(size, dtype=torch.int64, device=device)
            w0 = lookup(name).reshape(-1)
            key_list = keys(name)[seeds]
            for a in range(0, out.numel(), chunk):
                b = min(a + chunk, out.numel())
                acc = buffers[device][: b - a]
                acc.zero_()
                kernels.replay_(key_list, coefs, ends, a, acc, distribution)
                _write_chunk(w0[a:b], acc, scale, out[a:b])
            del w0  # a tensor read back from disk is freed before the next is read
            shown.update()
    return len(seeds)
