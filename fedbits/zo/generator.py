"""Random directions keyed by (seed, parameter name): the same z on every machine.

A direction is never drawn from a stateful RNG. Element ``i`` of parameter ``name`` for
seed ``s`` is ``TABLE[idx]``, where ``idx`` is a 12-bit slice of an integer hash of
``(key(s, name), i)`` (the exact definition is at the top of ``_kernel.c``). Because only
integer operations pick the value, a direction does not depend on the device, the
parameter's dtype, or the order in which parameters are visited, and any slice of a
tensor can be generated on its own (row chunks, thread slices, embedding rows).

Distributions (``method.distribution``):

* ``gaussian`` (default): the 4096 equiprobable quantiles Φ⁻¹((j+½)/4096) of N(0, 1),
  rescaled to unit variance and rounded to multiples of 1/4096 — a Gaussian quantised
  to 4096 levels, symmetric, tails cut at ±3.67σ.
* ``rademacher``: ±1 with probability ½ each.

Both have mean 0 and E[z zᵀ] = I (elements are uncorrelated), which is what the
two-point estimator needs. Every value is a multiple of 1/4096, which is what makes
replay exact (see :mod:`fedbits.zo.replay`).

This module is the reference implementation in torch operations (any device); the
compiled kernels in :mod:`fedbits.zo.native` compute the same numbers faster on CPU.
"""

from __future__ import annotations

import hashlib
import math
from functools import cache
from statistics import NormalDist
from typing import Literal

import torch

Distribution = Literal["gaussian", "rademacher"]
TABLE_SIZE = 4096
TABLE_SCALE = 4096  # every table value is an integer / TABLE_SCALE
_MASK32 = 0xFFFFFFFF


@cache
def table_ints(distribution: Distribution) -> tuple[int, ...]:
    """The table as integers (value × 4096), antisymmetric: t[4095-j] = -t[j]."""
    half = TABLE_SIZE // 2
    if distribution == "rademacher":
        upper = [TABLE_SCALE] * half
    elif distribution == "gaussian":
        quantiles = [NormalDist().inv_cdf((j + 0.5) / TABLE_SIZE) for j in range(half, TABLE_SIZE)]
        scale = 1 / math.sqrt(sum(q * q for q in quantiles) / half)
        upper = [round(q * scale * TABLE_SCALE) for q in quantiles]
    else:
        raise ValueError(f"unknown direction distribution {distribution!r}")
    return tuple([-v for v in reversed(upper)] + upper)


# Fingerprints of the tables: a platform whose math library rounded a quantile
# differently would generate different directions; refuse rather than diverge silently.
_TABLE_SHA256 = {
    "gaussian": "5c005d78c75fe549fdae1cefa893d47064f041220ae986d36ee1dc7738b5f3d9",
    "rademacher": "9e34f5e0a31b89b10e8fe13ab4ec439645fa4195b0b94b92e35b35935248fe7f",
}


@cache
def table(distribution: Distribution) -> torch.Tensor:
    """The 4096 direction values as float32 (exact: multiples of 1/4096)."""
    ints = table_ints(distribution)
    digest = hashlib.sha256(",".join(map(str, ints)).encode()).hexdigest()
    expected = _TABLE_SHA256[distribution]
    if digest != expected:
        raise RuntimeError(
            f"the {distribution} direction table computed on this platform differs from "
            "fedbits' reference (math library rounding); directions would not match other nodes"
        )
    return torch.tensor(ints, dtype=torch.float32) / TABLE_SCALE


def max_abs_int(distribution: Distribution) -> int:
    return max(abs(v) for v in table_ints(distribution))


@cache
def table_on(
    distribution: Distribution, device: torch.device, integer: bool = False
) -> torch.Tensor:
    """:func:`table` (float32) or the table × 4096 (int64, ``integer``) on ``device``,
    copied there once: a direction on an accelerator then costs no host transfer."""
    if integer:
        return torch.tensor(table_ints(distribution), dtype=torch.int64, device=device)
    return table(distribution).to(device)


def param_key(seed: int, name: str) -> int:
    """The 64-bit key of (seed, parameter name); names are the model's state-dict names."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _hash_indices(k0: int | torch.Tensor, k1: int | torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Table indices of the elements ``e`` (int64) for the key halves ``k0``/``k1`` (ints,
    or int64 columns of shape (S, 1) for S keys at once, broadcasting against ``e``).
    uint32 maths in int64 lanes: a product of two 32-bit values wraps in the top bit at
    worst, and only its low 32 bits are kept, so every device computes the same integers."""
    j = e & 15
    c = ((e >> 4) * 8 + (j & 7)) & _MASK32
    h = _fmix32(((c * 0x9E3779B9) + k0) & _MASK32)
    h = _fmix32(h ^ k1)
    return torch.where(j < 8, (h >> 4) & 0xFFF, h >> 20)


def _span(start: int, n: int, device: torch.device | str) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64, device=device)


def indices(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Table indices of elements ``start .. start+n`` (int64)."""
    return _hash_indices(key & _MASK32, key >> 32, _span(start, n, device))


def indices_at(key: int, elements: torch.Tensor) -> torch.Tensor:
    """Table indices of arbitrary elements (an int64 tensor of flat positions, any shape),
    on their device: e.g. the rows of an embedding that a batch looks up."""
    return _hash_indices(key & _MASK32, key >> 32, elements)


def indices_many(keys: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """:func:`indices` of elements ``start .. start+n`` for S keys at once, shape (S, n),
    on ``keys``' device. ``keys`` is int64 holding the uint64 keys' bits (as
    ``np.uint64`` arrays viewed as ``np.int64``)."""
    column = keys.view(-1, 1)
    k0, k1 = column & _MASK32, (column >> 32) & _MASK32  # >> sign-extends; the mask undoes it
    return _hash_indices(k0, k1, _span(start, n, keys.device))


def direction(
    key: int, start: int, n: int, distribution: Distribution, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """float32 values of elements ``start .. start+n`` (reference path, any device)."""
    dev = torch.device(device)
    return table_on(distribution, dev)[indices(key, start, n, dev)]
