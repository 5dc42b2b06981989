"""Rotation stage ``hadamard``: a seeded randomised Walsh-Hadamard transform.

A quantiser's error grows with its block's range, and one outlier sets the range for
every value beside it. Rotating the values first by ``H·D/√b`` (D a diagonal of random
signs, H the b×b Walsh-Hadamard matrix) spreads each outlier over b coordinates, so
the rotated vector's blocks have far smaller ranges; the receiver rotates back with
``D·H/√b``, the exact inverse (H·H = b·I). The usual companion of low-bit uniform
quantisation (QSGD-style, "Hadamard + ``uniform:bits=2,sr``"): stochastic rounding
stays unbiased through a linear map.

The c values are zero-padded to whole blocks of b = min(``block``, the power of two
at or above c) — ``block=N`` a power of two, default 256 — so the values stage writes
``ceil(c/b)·b`` values. The signs are a documented function of a u64 seed drawn from
the sender's generator (:func:`fedbits.compress.sparsify.random_signs`); the seed
travels first, 8 bytes, so the receiver needs no shared state. Both directions run
in float64 and round once to float32: the round trip is exact up to that rounding.
Every seed is valid; what the values stage lets through, the chain checks is finite
after the inverse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from fedbits.compress.codec import Buffer, StageError
from fedbits.compress.options import int_option, parse_options
from fedbits.compress.registry import register_stage
from fedbits.compress.sparsify import random_signs

DEFAULT_BLOCK = 256
MAX_BLOCK = 1 << 16
_MAX_SEED = 2**63 - 1  # torch.randint's exclusive bound for an int64 draw


@dataclass(frozen=True)
class Hadamard:
    """The randomised Hadamard rotation over blocks of ``block`` (a power of two)."""

    block: int = DEFAULT_BLOCK
    name: str = "hadamard"
    header_bytes: int = 8  # the u64 seed

    @property
    def spec(self) -> str:
        return f"hadamard:{self.wire_params}"

    @property
    def wire_params(self) -> str:
        return f"block={self.block}"

    def __str__(self) -> str:
        return self.spec

    def _width(self, count: int) -> int:
        """The block actually used: no wider than the power of two at or above count."""
        return min(self.block, 1 << max(count - 1, 0).bit_length())

    def size(self, count: int) -> int:
        width = self._width(count)
        return -(-count // width) * width

    def forward(
        self, values: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, Buffer]:
        if generator is None:
            raise ValueError(f"{self} needs a torch.Generator to draw its seed")
        seed = int(torch.randint(0, _MAX_SEED, (1,), generator=generator))
        count = values.numel()
        padded = np.zeros(self.size(count), dtype=np.float64)
        padded[:count] = values.numpy()
        padded *= random_signs(seed, padded.size)
        with np.errstate(over="ignore"):
            rotated = self._rotate(padded, count).astype(np.float32)
        if not np.isfinite(rotated).all():
            raise ValueError(f"{self}: values within √{self._width(count)} of float32's "
                             "largest overflow when rotated")
        return torch.from_numpy(rotated), struct.pack("<Q", seed)

    def inverse(self, header: memoryview, values: torch.Tensor, count: int,
                what: str) -> torch.Tensor:
        seed = struct.unpack("<Q", header)[0]
        back = self._rotate(values.numpy().astype(np.float64), count)
        back *= random_signs(seed, back.size)
        with np.errstate(over="ignore"):  # the chain refuses what overflowed
            return torch.from_numpy(back[:count].astype(np.float32))

    def _rotate(self, v: np.ndarray, count: int) -> np.ndarray:
        """H/√b applied to each block of ``v`` (its own inverse), in float64."""
        width = self._width(count)
        a, half = v.reshape(-1, width), 1
        while half < width:  # butterflies at distance half, inside groups of 2·half
            pairs = a.reshape(-1, width // (2 * half), 2, half)
            a = np.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]),
                         axis=2)
            half *= 2
        return a.reshape(-1) / np.sqrt(width)


def parse(argument: str | None) -> Hadamard:
    block = int_option(parse_options(argument, {"block"}), "block", DEFAULT_BLOCK, 2, MAX_BLOCK)
    if block & (block - 1):
        raise StageError(f"block={block} must be a power of two")
    return Hadamard(block)


register_stage("hadamard", parse, role="transform", usage="hadamard[:block=N]")
