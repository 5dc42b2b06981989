"""Positions stages: ``topk``, ``topk_tensor`` and ``randk``, each with a density.

k is ``max(1, ceil(density · n))`` for n values (per tensor for ``topk_tensor``, so
every non-empty tensor sends at least one value), computed exactly on the density
the normalised spec shows. Top-k positions travel in the smallest of three index
codings (:mod:`fedbits.compress.indices`); random-k positions are a documented
function of a 64-bit seed (:mod:`fedbits.compress.sparsify`), so only the seed does.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
import torch

from fedbits.compress.codec import StageError
from fedbits.compress.indices import decode_indices, encode_indices
from fedbits.compress.options import density
from fedbits.compress.registry import register_stage
from fedbits.compress.sparsify import random_positions, segment_topk_positions, topk_positions
from fedbits.errors import WireError
from fedbits.wire import Reader

SparsifierName = Literal["topk", "topk_tensor", "randk"]
_SEED_BYTES = 8
_MAX_SEED = 2**63 - 1  # torch.randint's exclusive bound for an int64 draw


@dataclass(frozen=True)
class Sparsifier:
    """Which positions travel: top-k by |x| (global or per tensor) or random-k."""

    name: SparsifierName
    density: Fraction  # exactly the value the normalised spec string spells

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.wire_params}"

    @property
    def wire_params(self) -> str:
        return repr(float(self.density))

    def __str__(self) -> str:
        return self.spec

    @property
    def uses_segments(self) -> bool:
        return self.name == "topk_tensor"

    def k(self, n: int) -> int:
        """ceil(density·n), at least 1 unless n is 0."""
        return min(n, max(1, math.ceil(self.density * n)))

    def count(self, n: int, segments: Sequence[int] | None) -> int:
        if self.uses_segments:
            return sum(self.k(size) for size in segments or [])
        return self.k(n)

    def max_bytes(self, n: int) -> int:
        # The encoder keeps the smallest index coding, never above the bitmask.
        return _SEED_BYTES if self.name == "randk" else 1 + -(-n // 8)

    def select(
        self, x: np.ndarray, segments: Sequence[int] | None, generator: torch.Generator | None
    ) -> tuple[np.ndarray, bytes]:
        n = x.size
        if self.name == "randk":
            if generator is None:
                raise ValueError(f"{self} needs a torch.Generator to draw its seed")
            seed = int(torch.randint(0, _MAX_SEED, (1,), generator=generator))
            return random_positions(seed, n, self.k(n)), struct.pack("<Q", seed)
        if self.uses_segments:
            segs = list(segments or [])
            idx = segment_topk_positions(x, segs, [self.k(size) for size in segs])
        else:
            idx = topk_positions(x, self.k(n))
        return idx, encode_indices(idx, n)

    def read(self, r: Reader, n: int, segments: Sequence[int] | None, what: str) -> np.ndarray:
        if self.name == "randk":
            return random_positions(r.u64("seed"), n, self.k(n))
        idx = decode_indices(r, n, what)
        if self.uses_segments and idx.size == self.count(n, segments):  # else the chain says so
            segs = list(segments or [])
            bounds = np.searchsorted(idx, np.cumsum([0, *segs]))
            if np.diff(bounds).tolist() != [self.k(size) for size in segs]:
                raise WireError(f"{what}: field indices: positions are not {self} per tensor")
        return idx


def _factory(name: SparsifierName) -> Callable[[str | None], Sparsifier]:
    def parse(argument: str | None) -> Sparsifier:
        if not argument:
            raise StageError(f"{name} needs a density, e.g. {name}:1/16")
        return Sparsifier(name, density(argument))

    return parse


_NAMES: tuple[SparsifierName, ...] = ("topk", "topk_tensor", "randk")
for _name in _NAMES:
    register_stage(_name, _factory(_name), role="positions", usage=f"{_name}:<density>")
