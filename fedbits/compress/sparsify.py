"""Which positions travel: top-k by magnitude, per tensor or global, or random-k.

All three return sorted int64 positions. Top-k breaks ties by position (among equal
magnitudes at the threshold the lowest positions win), so the same input always
selects the same set on every machine.

Random-k positions are a pure function of a 64-bit seed, defined here rather than
by a library's sampler so that a receiver with a different numpy or torch version
regenerates exactly the same set: the positions are the first k distinct values of
``floor(splitmix64(seed, i) · n / 2^64)`` for i = 0, 1, 2, ... (for k > n/2, the
first n − k distinct values are the positions *left out*). This costs the wire 8
bytes instead of an index set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# The multiply-shift below needs n <= 2^32, the sort keys fewer than 2^32 draws.
MAX_RANDOM_N = 1 << 31
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)


def topk_positions(x: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest |x|, ties at the threshold broken by lowest position.

    O(n) introselect (np.partition) for the threshold, then one pass to select; a
    second pass only when values tie at the threshold.
    """
    n = x.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    magnitude = np.abs(x)
    threshold = np.partition(magnitude, n - k)[n - k]
    keep = magnitude >= threshold
    surplus = int(np.count_nonzero(keep)) - k
    if surplus:  # ties at the threshold: the highest positions among them stay behind
        ties = np.flatnonzero(magnitude == threshold)
        keep[ties[ties.size - surplus :]] = False
    return np.flatnonzero(keep).astype(np.int64, copy=False)


def segment_topk_positions(
    x: np.ndarray, segments: Sequence[int], ks: Sequence[int]
) -> np.ndarray:
    """Top-``ks[i]`` within each segment ``i`` (one tensor of the flat vector)."""
    parts = []
    offset = 0
    for size, k in zip(segments, ks, strict=True):
        parts.append(topk_positions(x[offset : offset + size], k) + offset)
        offset += size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _splitmix64(seed: int, start: int, count: int) -> np.ndarray:
    """Outputs start .. start+count-1 of SplitMix64 seeded with ``seed`` (wrapping u64)."""
    state = np.uint64(seed) + (np.arange(start + 1, start + count + 1, dtype=np.uint64) * _GOLDEN)
    z = (state ^ (state >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def random_signs(seed: int, count: int) -> np.ndarray:
    """``count`` float64 signs ±1, a documented function of ``seed``: -1 where the top
    bit of SplitMix64 output i is set (the ``hadamard`` stage's random diagonal)."""
    return 1.0 - 2.0 * (_splitmix64(seed, 0, count) >> np.uint64(63)).astype(np.float64)


def _uniform_below(z: np.ndarray, n: int) -> np.ndarray:
    """floor(z · n / 2^64), exactly, in 64-bit arithmetic (n <= 2^32)."""
    n64 = np.uint64(n)
    return ((z >> np.uint64(32)) * n64 + (((z & _LOW32) * n64) >> np.uint64(32))) >> np.uint64(32)


def _first_distinct(seed: int, n: int, want: int) -> np.ndarray:
    """The first ``want`` distinct values of the seeded stream, sorted ascending.

    One sort of (value << 32 | draw number) keys finds each value's first draw; the
    values whose first draw is among the ``want`` earliest are the answer.
    """
    if want == 0:
        return np.zeros(0, dtype=np.uint64)
    drawn = np.zeros(0, dtype=np.uint64)
    while True:
        # Expected draws for `want` distinct values out of n (coupon collector), +5%.
        expected = n * math.log(n / (n - want))  # want <= n/2 here
        batch = max(64, int(expected * 1.05) - drawn.size + 64, drawn.size // 4)
        drawn = np.concatenate([drawn, _uniform_below(_splitmix64(seed, drawn.size, batch), n)])
        keys = np.sort((drawn << np.uint64(32)) | np.arange(drawn.size, dtype=np.uint64))
        values = keys >> np.uint64(32)
        first = np.ones(keys.size, dtype=bool)
        first[1:] = values[1:] != values[:-1]
        if np.count_nonzero(first) >= want:
            break
    first_draw = keys[first] & _LOW32
    cutoff = np.partition(first_draw, want - 1)[want - 1]
    return values[first][first_draw <= cutoff]


def random_positions(seed: int, n: int, k: int) -> np.ndarray:
    """k uniformly random distinct positions in [0, n), sorted, determined by ``seed``."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if n > MAX_RANDOM_N:
        raise ValueError(f"random-k supports vectors of at most 2^31 values, got {n}")
    if k <= n // 2:
        return _first_distinct(seed, n, k).astype(np.int64)
    keep = np.ones(n, dtype=bool)
    keep[_first_distinct(seed, n, n - k).astype(np.int64)] = False
    return np.flatnonzero(keep).astype(np.int64)
