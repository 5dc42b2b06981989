"""Sorted position sets on the wire: bitmask, delta-varint or Elias–Fano.

A top-k payload must say *which* k of n positions it carries, and the cheapest way
depends on the set: a bitmask wins when the set is dense, delta-varint when positions
cluster, Elias–Fano (≈ 2 + log2(n/c) bits per position whatever the spread) for a
spread-out sparse set. :func:`encode_indices` computes the exact size of all three
and writes the smallest, after a tag byte naming it. Sizes in bytes for c positions
out of n (``leb(v)``: LEB128 length of v, 1 byte below 128)::

    bitmask      1 + ceil(n / 8)
    delta-varint 1 + leb(V) + V,  V = Σ leb(gap_j), gap_0 = i_0, gap_j = i_j − i_(j−1) − 1
    Elias–Fano   1 + leb(c) + ceil(c·l / 8) + ceil((c + ((n − 1) >> l)) / 8),
                 l = floor(log2(n / c)) (0 when c ≥ n)

The gaps drop the implied "+1" between strictly increasing positions, so runs of
adjacent positions cost one zero byte each. Elias–Fano stores each position's low
``l`` bits verbatim (LSB first) and its high part in unary: bit ``(i_j >> l) + j`` of
the upper bitvector is set. All bit streams are little-endian bit order.

Every coder is vectorised numpy; the decoder checks each structure exactly (padding
bits zero, canonical varints, strictly increasing positions below n) and raises
:class:`~fedbits.errors.WireError` naming the caller's ``what``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedbits.errors import WireError
from fedbits.wire import Reader

IndexCoding = Literal["bitmask", "varint", "elias_fano"]
# Tag byte of each coding; also the tie-break order (first wins).
TAGS: dict[IndexCoding, int] = {"bitmask": 0, "elias_fano": 1, "varint": 2}
_CODINGS = {tag: coding for coding, tag in TAGS.items()}
_MAX_VARINT_BYTES = 10  # ceil(64 / 7): a u64 needs at most ten 7-bit groups


# ---------------------------------------------------------------- LEB128


def leb128_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes each value takes as LEB128 (7 payload bits per byte, at least 1)."""
    v = np.asarray(values, dtype=np.uint64)
    lengths = np.ones(v.shape, dtype=np.int64)
    for group in range(1, _MAX_VARINT_BYTES):
        longer = v >= np.uint64(1 << (7 * group))
        if not longer.any():  # gaps rarely need more than two or three groups
            break
        lengths += longer
    return lengths


def leb128_encode(values: np.ndarray) -> bytes:
    """Concatenated LEB128 codes of ``values`` (unsigned, low group first).

    Vectorised over the at most ten 7-bit groups, never over values.
    """
    v = np.asarray(values, dtype=np.uint64)
    lengths = leb128_lengths(v)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]) if v.size else 0, dtype=np.uint8)
    for group in range(int(lengths.max()) if v.size else 0):
        has = lengths > group
        septet = (v[has] >> np.uint64(7 * group)) & np.uint64(0x7F)
        more = (lengths[has] > group + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + group] = (septet | more).astype(np.uint8)
    return out.tobytes()


def leb128_decode(data: np.ndarray, what: str, field: str) -> np.ndarray:
    """Decode a buffer holding whole LEB128 codes only; uint64 values.

    Rejects a code cut short, longer than ten bytes, overflowing 64 bits, or with a
    redundant trailing zero group (so every value has exactly one encoding).
    """
    buf = np.asarray(data, dtype=np.uint8)
    if buf.size == 0:
        return np.zeros(0, dtype=np.uint64)
    last = buf < 0x80
    if not last[-1]:
        raise WireError(f"{what}: field {field}: the last varint is cut short")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_BYTES:
        raise WireError(f"{what}: field {field}: a varint is longer than {_MAX_VARINT_BYTES} bytes")
    if ((buf[ends] == 0) & (lengths > 1)).any():
        raise WireError(f"{what}: field {field}: a varint has a redundant zero group")
    if ((lengths == _MAX_VARINT_BYTES) & (buf[ends] > 1)).any():
        raise WireError(f"{what}: field {field}: a varint overflows 64 bits")
    group = np.arange(buf.size, dtype=np.int64) - np.repeat(starts, lengths)
    parts = (buf & 0x7F).astype(np.uint64) << (7 * group).astype(np.uint64)
    return np.add.reduceat(parts, starts)


def _write_leb(value: int) -> bytes:
    return leb128_encode(np.array([value], dtype=np.uint64))


def _read_leb(r: Reader, field: str) -> int:
    """One LEB128 value, read byte by byte (at most ten reads)."""
    code = bytearray()
    while not code or code[-1] & 0x80:
        if len(code) == _MAX_VARINT_BYTES:
            raise WireError(
                f"{r.what}: field {field}: varint longer than {_MAX_VARINT_BYTES} bytes"
            )
        code.append(r.u8(field))
    return int(leb128_decode(np.frombuffer(bytes(code), np.uint8), r.what, field)[0])


# ---------------------------------------------------------------- sizes


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.diff(indices, prepend=-1) - 1
    return gaps.astype(np.uint64)


def _ef_low_bits(count: int, n: int) -> int:
    """floor(log2(n / count)): the largest l with count·2^l <= n."""
    return max(0, (n // count).bit_length() - 1) if count else 0


def _ef_sizes(count: int, n: int) -> tuple[int, int]:
    """(low-bits bytes, upper-bitvector bytes) of an Elias–Fano set."""
    if count == 0:
        return 0, 0
    low = _ef_low_bits(count, n)
    return -(-count * low // 8), -(-(count + ((n - 1) >> low)) // 8)


def coded_sizes(indices: np.ndarray, n: int) -> dict[IndexCoding, int]:
    """Exact byte size of each coding of ``indices`` (tag byte included)."""
    idx = _check(indices, n)
    varint_body = int(leb128_lengths(_gaps(idx)).sum())
    count = int(idx.size)
    return {
        "bitmask": 1 + -(-n // 8),
        "elias_fano": 1 + len(_write_leb(count)) + sum(_ef_sizes(count, n)),
        "varint": 1 + len(_write_leb(varint_body)) + varint_body,
    }


def _check(indices: np.ndarray, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx[0] < 0 or idx[-1] >= n or (np.diff(idx) <= 0).any()):
        raise ValueError(f"indices must be strictly increasing within [0, {n})")
    return idx


# ---------------------------------------------------------------- encode


def _pack_low_bits(values: np.ndarray, bits: int) -> bytes:
    """The low ``bits`` bits of each value, LSB first, one little-endian bit stream.

    One pass per bit (``bits`` is small: c·2^bits <= n) beats packbits along rows.
    """
    v = values.astype(np.uint64, copy=False)
    stream = np.empty((v.size, bits), dtype=np.uint8)
    for bit in range(bits):
        stream[:, bit] = (v >> np.uint64(bit)) & np.uint64(1)
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def _set_bits(positions: np.ndarray, length: int) -> bytes:
    """A little-endian bitvector of ``length`` bits (padded to bytes) with ``positions`` set."""
    bits = np.zeros(-(-length // 8) * 8, dtype=np.uint8)
    bits[positions] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def encode_indices(indices: np.ndarray, n: int, coding: IndexCoding | None = None) -> bytes:
    """Tag byte + the positions in ``coding``, by default the smallest of the three.

    ``indices``: strictly increasing integers in [0, n) (ValueError otherwise).
    """
    idx = _check(indices, n)
    if coding is None:
        sizes = coded_sizes(idx, n)
        smallest: IndexCoding = min(TAGS, key=lambda c: (sizes[c], TAGS[c]))
        coding = smallest
    tag = bytes([TAGS[coding]])
    if coding == "bitmask":
        return tag + _set_bits(idx, n)
    if coding == "varint":
        body = leb128_encode(_gaps(idx))
        return tag + _write_leb(len(body)) + body
    count = int(idx.size)
    if count == 0:
        return tag + _write_leb(0)
    low = _ef_low_bits(count, n)
    upper = (idx >> low) + np.arange(count)
    upper_len = count + ((n - 1) >> low)
    return tag + _write_leb(count) + _pack_low_bits(idx, low) + _set_bits(upper, upper_len)


# ---------------------------------------------------------------- decode


def _bits(data: bytes, length: int, what: str, field: str) -> np.ndarray:
    """Unpack a little-endian bitvector, refusing set padding bits past ``length``."""
    stream = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    if stream[length:].any():
        raise WireError(f"{what}: field {field}: padding bits are set")
    return stream[:length]


def _unpack_low_bits(data: bytes, count: int, bits: int, what: str) -> np.ndarray:
    stream = _bits(data, count * bits, what, "indices.low_bits").reshape(count, bits)
    low = np.zeros(count, dtype=np.uint64)
    for bit in range(bits):
        low |= stream[:, bit].astype(np.uint64) << np.uint64(bit)
    return low


def _validated(idx: np.ndarray, n: int, what: str) -> np.ndarray:
    """Positions as int64 after checking they are strictly increasing and below n.

    ``idx`` is uint64 and compared as such: a sum that wrapped past 2^64 shows up as
    a decrease.
    """
    if (idx[1:] <= idx[:-1]).any():
        raise WireError(f"{what}: field indices: positions are not strictly increasing")
    if idx.size and idx[-1] >= np.uint64(n):
        raise WireError(f"{what}: field indices: position {int(idx[-1])} is not below {n}")
    return idx.astype(np.int64)


def decode_indices(r: Reader, n: int, what: str) -> np.ndarray:
    """Read what :func:`encode_indices` wrote: sorted int64 positions in [0, n).

    Allocation is bounded by n and by the bytes present; any inconsistency is a
    :class:`WireError` naming ``what``.
    """
    tag = r.u8("indices.coding")
    if tag not in _CODINGS:
        raise WireError(f"{what}: field indices.coding: unknown index coding {tag}")
    coding = _CODINGS[tag]
    if coding == "bitmask":
        bits = _bits(r.raw(-(-n // 8), "indices.bitmask"), n, what, "indices.bitmask")
        return np.flatnonzero(bits).astype(np.int64)
    if coding == "varint":
        nbytes = _read_leb(r, "indices.varint_bytes")
        if nbytes > r.remaining:
            raise WireError(
                f"{what}: field indices.varint: {nbytes} bytes declared, {r.remaining} left"
            )
        gaps = leb128_decode(
            np.frombuffer(r.raw(nbytes, "indices.varint"), np.uint8), what, "indices.varint"
        )
        if gaps.size > n or (gaps.size and gaps.max() >= np.uint64(n)):
            raise WireError(f"{what}: field indices.varint: positions run past {n}")
        return _validated(np.cumsum(gaps + np.uint64(1)) - np.uint64(1), n, what)
    count = _read_leb(r, "indices.count")
    if count > n:
        raise WireError(f"{what}: field indices.count: {count} positions out of {n}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    low_len, upper_len = _ef_sizes(count, n)
    low_bits = _ef_low_bits(count, n)
    low = _unpack_low_bits(r.raw(low_len, "indices.low_bits"), count, low_bits, what)
    upper_bits = count + ((n - 1) >> low_bits)
    ones = np.flatnonzero(
        _bits(r.raw(upper_len, "indices.upper"), upper_bits, what, "indices.upper")
    )
    if ones.size != count:
        raise WireError(f"{what}: field indices.upper: {ones.size} positions, expected {count}")
    high = (ones - np.arange(count)).astype(np.uint64)
    return _validated((high << np.uint64(low_bits)) | low, n, what)
