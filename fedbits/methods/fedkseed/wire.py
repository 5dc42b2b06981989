"""FedKSeed entries on the wire: (seed index, scalar) pairs over a pool of K seeds.

Every FedKSeed message is a set of entries: an uplink is a client's τ pairs in
step order (indices may repeat) or its touched pool entries, a downlink is the pool
entries that changed since a client last synced, or the whole pool. This module
encodes such a set in one of two layouts:

* ``"reference"``: the paper's accounting, a 4-byte index and a 4-byte float32 per
  entry (or K float32 values dense), nothing compressed, so byte counts can be
  compared with the paper.
* ``"compact"``: indices bit-packed in :func:`index_bits` bits, values in a chosen
  scalar dtype, optionally zstd; the encoder picks whichever representation is
  smallest for this particular message.

Scalars and compression come from the codec layer (:mod:`fedbits.compress`) where it
has the format: float32 and bfloat16 codes are its ``fp32`` and ``bf16`` value
stages' element coding, and zstd is its ``zstd`` stage's compression and bounded
decompression. float16 and int8 are FedKSeed's own: one power-of-two exponent or one
float32 scale for the whole message, computed in float64, so that a pool scalar
anywhere from 2^-152 to 2^142 travels (the chain's ``fp16`` and ``int8`` stages
quantise float32 vectors blockwise).

A section starts with one tag byte: the representation in the low bits
(:data:`_LIST`, :data:`_DENSE`, :data:`_BITMASK`) and :data:`_ZSTD` in the high bit
when the representation follows as a zstd-compressed blob. Byte sizes, with n
entries, b = ``index_bits(K)``, w the value width and H the values header (1 byte
exponent for float16, 4 byte scale for int8, else 0)::

    reference  LIST    1 + 4 + 8n
               DENSE   1 + 4K
    compact    LIST    1 + 4 + ceil(n·b/8) + H + w·n
               DENSE   1 + H + w·K
               BITMASK 1 + ceil(K/8) + H + w·n
               zstd    1 + 4 + len(zstd(any of the above without its tag))

For a pool (``unique=True``) an entry whose value quantises to exactly 0.0 carries
no information, and DENSE cannot express it, so the encoder drops such entries
from every representation: the decoder returns the non-zero entries only. A step
list (``unique=False``) keeps its zeros, since its length and order are the steps.

The decoder trusts nothing: every count is checked against ``max_count`` and the
bytes present before anything is allocated, decompression is bounded by what the
representation could need, and any malformed input is a
:class:`~fedbits.errors.WireError` naming the caller's ``what`` and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from fedbits.compress.stages.floats import FloatValues
from fedbits.compress.stages.zstd import Zstd, decompress_bounded
from fedbits.config import DType
from fedbits.errors import WireError
from fedbits.wire import Reader, Writer

ScalarDtype = Literal[DType, "int8"]
Layout = Literal["compact", "reference"]

_LIST, _DENSE, _BITMASK = 0, 1, 2
_ZSTD = 0x80
_REP_NAMES = {_LIST: "list", _DENSE: "dense", _BITMASK: "bitmask"}
_ZSTD_STAGE = Zstd(level=19)
_MAX_POOL = 1 << 32  # indices travel as u32 in the reference layout
_MAX_COUNT = (1 << 32) - 1  # LIST counts travel as u32

# The codec layer's value stages for the scalar dtypes it has.
_SHARED = {"float32": FloatValues("fp32"), "bfloat16": FloatValues("bf16")}
# Little-endian code dtype and values-header bytes of each scalar dtype.
_CODE_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "float32": (_SHARED["float32"].code_dtype, 0),
    "float16": (np.dtype("<f2"), 1),  # int8 power-of-two exponent
    "bfloat16": (_SHARED["bfloat16"].code_dtype, 0),
    "int8": (np.dtype("i1"), 4),  # float32 scale
}
# float16 codes are scaled into [2^14, 2^15): the top binade below 65504, no overflow.
_F16_TOP_EXP = 15
_I8_MAX = 127
# Exponent bits that, all set, make a code inf or NaN.
_NONFINITE = {"float32": 0x7F800000, "float16": 0x7C00, "bfloat16": 0x7F80}


@dataclass(frozen=True)
class EntryFormat:
    """How entries travel.

    ``layout="reference"``: u32 index + float32 value per entry, or K float32 dense;
    ``dtype`` and ``zstd`` are ignored. ``layout="compact"``: bit-packed indices,
    values in ``dtype``, and with ``zstd`` each representation is also tried
    compressed (level 19), kept only when smaller.
    """

    layout: Layout
    dtype: ScalarDtype = "float16"
    zstd: bool = True

    def __post_init__(self) -> None:
        if self.layout not in get_args(Layout):
            raise ValueError(f"unknown entry layout {self.layout!r}")
        if self.dtype not in get_args(ScalarDtype):
            raise ValueError(f"unknown entry scalar dtype {self.dtype!r}")


def index_bits(pool_size: int) -> int:
    """Bits per packed index: ceil(log2 K), at least 1 so a pool of one still packs."""
    _check_pool(pool_size)
    return max(1, (pool_size - 1).bit_length())


def _check_pool(pool_size: int) -> None:
    if not 1 <= pool_size <= _MAX_POOL:
        raise ValueError(f"pool size must be in [1, 2^32], got {pool_size}")


def _scalar(fmt: EntryFormat) -> ScalarDtype:
    """The dtype values actually travel in."""
    return "float32" if fmt.layout == "reference" else fmt.dtype


def _compressed(fmt: EntryFormat) -> bool:
    return fmt.layout == "compact" and fmt.zstd


def _representations(fmt: EntryFormat) -> tuple[int, ...]:
    """Allowed representations, in tie-break order (plainest first)."""
    return (_LIST, _DENSE) if fmt.layout == "reference" else (_LIST, _BITMASK, _DENSE)


def _index_width(pool_size: int, fmt: EntryFormat) -> int:
    return 32 if fmt.layout == "reference" else index_bits(pool_size)


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class _Coded:
    header: bytes  # written before the codes: float16 exponent or int8 scale
    param: int | np.float32 | None  # what the header carries, for dequantisation
    codes: np.ndarray  # little-endian, one per value


def _encode_values(values: np.ndarray, scalar: ScalarDtype) -> _Coded:
    """Quantise ``values`` (finite float64) to wire codes; ValueError if they overflow."""
    code_dtype, _ = _CODE_DTYPES[scalar]
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if scalar == "float16":
        # Clamping at -128 keeps tiny pools encodable (they lose precision, down to
        # zero below 2^-152); above 2^142 nothing fits, which is a caller's bug.
        exp = max(-128, int(np.frexp(peak)[1]) - _F16_TOP_EXP) if peak else 0
        if exp > 127:
            raise ValueError(f"entry values up to {peak:g} overflow the float16 exponent")
        codes = np.ldexp(values, -exp).astype(code_dtype)
        return _Coded(np.int8(exp).tobytes(), exp, codes)
    if scalar == "int8":
        with np.errstate(over="ignore"):
            scale = np.float32(peak / _I8_MAX)
        if not np.isfinite(scale):
            raise ValueError(f"entry values up to {peak:g} overflow the int8 float32 scale")
        if scale == 0:
            codes = np.zeros(values.shape, code_dtype)
        else:
            steps = np.rint(values / np.float64(scale))
            codes = np.clip(steps, -_I8_MAX, _I8_MAX).astype(code_dtype)
        return _Coded(scale.astype("<f4").tobytes(), scale, codes)
    with np.errstate(over="ignore"):
        f32 = values.astype(np.float32)
    if not np.isfinite(f32).all():
        raise ValueError(f"entry values up to {peak:g} overflow float32")
    return _Coded(b"", None, _SHARED[scalar].codes(torch.from_numpy(f32)))


def _dequantise(coded: _Coded, scalar: ScalarDtype) -> np.ndarray:
    """The float64 values codes stand for; shared by encoder and decoder so that
    :func:`quantize` and :func:`decode_entries` agree bit for bit."""
    codes = coded.codes
    if scalar == "float16":
        assert isinstance(coded.param, int)  # the exponent, set for float16 codes
        return np.ldexp(codes.astype(np.float64), coded.param)
    if scalar == "int8":
        return np.float64(coded.param) * codes.astype(np.float64)
    return _SHARED[scalar].values(codes).numpy().astype(np.float64)


def _read_values(
    r: Reader, count: int, scalar: ScalarDtype, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """(code bit patterns, dequantised values); refuses codes that are not finite."""
    code_dtype, _ = _CODE_DTYPES[scalar]
    param: int | np.float32 | None = None
    if scalar == "float16":
        param = int(np.frombuffer(r.raw(1, "entries.values.exponent"), np.int8)[0])
    elif scalar == "int8":
        param = np.float32(r.f32("entries.values.scale"))
        if not (np.isfinite(param) and param >= 0):
            raise WireError(
                f"{what}: field entries.values.scale: {param} is not a finite scale >= 0"
            )
    codes = np.frombuffer(r.raw(count * code_dtype.itemsize, "entries.values"), code_dtype)
    bits = codes.view(f"<u{code_dtype.itemsize}")
    if scalar == "int8":
        if (codes == -_I8_MAX - 1).any():
            raise WireError(f"{what}: field entries.values: int8 code -128 is not allowed")
    elif ((bits & _NONFINITE[scalar]) == _NONFINITE[scalar]).any():
        # Checked on the bits: dequantising a NaN would only warn, and every finite
        # code dequantises to a finite float64.
        raise WireError(f"{what}: field entries.values: non-finite value")
    return bits, _dequantise(_Coded(b"", param, codes), scalar)


def quantize(values: np.ndarray, fmt: EntryFormat) -> np.ndarray:
    """The float64 values a decoder will reconstruct from ``values`` under ``fmt``
    (bit for bit what :func:`decode_entries` returns), so a sender can use the
    transmitted values as the truth. ValueError on non-finite or overflowing values."""
    scalar = _scalar(fmt)
    return _dequantise(_encode_values(_check_values(values), scalar), scalar)


# ---------------------------------------------------------------- indices


def _pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Indices LSB-first, ``bits`` each, in one little-endian bit stream."""
    if bits == 32:
        return indices.astype("<u4").tobytes()
    octets = indices.astype("<u8").view(np.uint8).reshape(-1, 8)
    stream = np.unpackbits(octets, axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def _unpack_indices(data: bytes, count: int, bits: int, pool_size: int, what: str) -> np.ndarray:
    if bits == 32:
        indices = np.frombuffer(data, "<u4").astype(np.int64)
    else:
        stream = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        if stream[count * bits :].any():
            raise WireError(f"{what}: field entries.indices: non-zero padding bits")
        columns = stream[: count * bits].reshape(count, bits)
        columns = np.packbits(columns, axis=1, bitorder="little")
        octets = np.zeros((count, 8), np.uint8)
        octets[:, : columns.shape[1]] = columns
        indices = octets.view("<u8").reshape(count).astype(np.int64)
    if indices.size and indices.max() >= pool_size:
        raise WireError(
            f"{what}: field entries.indices: index {int(indices.max())} "
            f"outside the pool of {pool_size}"
        )
    return indices


# ---------------------------------------------------------------- encode


def _check_values(values: np.ndarray) -> np.ndarray:
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim != 1:
        raise ValueError(f"entry values must be 1-D, got shape {vals.shape}")
    if not np.isfinite(vals).all():
        raise ValueError("entry values must be finite")
    return vals


def _check_indices(indices: np.ndarray, count: int, pool_size: int, unique: bool) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.shape != (count,):
        raise ValueError(f"entry indices have shape {idx.shape}, values ({count},)")
    if count and idx.dtype.kind not in "iu":
        raise ValueError(f"entry indices must be integers, got {idx.dtype}")
    if count and (idx.min() < 0 or idx.max() >= pool_size):
        raise ValueError(f"entry indices must lie in [0, {pool_size})")
    idx = idx.astype(np.int64)
    if unique and (np.diff(idx) <= 0).any():
        raise ValueError("unique entry indices must be sorted strictly ascending")
    return idx


def encode_entries(
    w: Writer,
    indices: np.ndarray,
    values: np.ndarray,
    pool_size: int,
    fmt: EntryFormat,
    *,
    unique: bool,
) -> None:
    """Write entries in the smallest representation ``fmt`` allows.

    ``unique=True``: a pool's entries, indices strictly ascending; zero-valued
    entries (after quantisation) are dropped, and DENSE/BITMASK are allowed.
    ``unique=False``: a list in order, repeats and zeros kept; LIST only.
    """
    _check_pool(pool_size)
    vals = _check_values(values)
    idx = _check_indices(indices, vals.size, pool_size, unique)
    if vals.size > _MAX_COUNT:
        raise ValueError(f"{vals.size} entries do not fit a u32 count")
    scalar = _scalar(fmt)
    coded = _encode_values(vals, scalar)
    codes = coded.codes
    if unique:
        keep = _dequantise(coded, scalar) != 0.0
        idx, codes = idx[keep], codes[keep]

    bodies: dict[int, bytes] = {
        _LIST: (
            len(codes).to_bytes(4, "little")
            + _pack_indices(idx, _index_width(pool_size, fmt))
            + coded.header
            + codes.tobytes()
        )
    }
    if unique:
        if _BITMASK in _representations(fmt):
            mask = np.zeros(pool_size, np.uint8)
            mask[idx] = 1
            bitmask = np.packbits(mask, bitorder="little").tobytes()
            bodies[_BITMASK] = bitmask + coded.header + codes.tobytes()
        dense = np.zeros(pool_size, codes.dtype)
        dense[idx] = codes  # a zero code is 0.0 in every scalar dtype
        bodies[_DENSE] = coded.header + dense.tobytes()

    candidates = [(rep, bodies[rep]) for rep in _representations(fmt) if rep in bodies]
    if _compressed(fmt):
        packed = [(rep | _ZSTD, _ZSTD_STAGE.compress(body)) for rep, body in candidates]
        candidates += [(tag, len(data).to_bytes(4, "little") + data) for tag, data in packed]
    tag, payload = min(candidates, key=lambda c: len(c[1]))  # ties: first, i.e. plainest
    w.u8(tag).raw(payload)


# ---------------------------------------------------------------- decode


def _body_bound(rep: int, pool_size: int, fmt: EntryFormat, max_count: int) -> int:
    """The most bytes an honest representation body can take: caps decompression."""
    code_dtype, header = _CODE_DTYPES[_scalar(fmt)]
    if rep == _LIST:
        count = min(max_count, _MAX_COUNT)
        bits = _index_width(pool_size, fmt)
        return 4 + _packed_len(count, bits) + header + count * code_dtype.itemsize
    if rep == _BITMASK:
        return _packed_len(pool_size, 1) + header + min(pool_size, max_count) * code_dtype.itemsize
    return header + pool_size * code_dtype.itemsize


def _read_rep(
    r: Reader, rep: int, pool_size: int, fmt: EntryFormat, what: str, max_count: int
) -> tuple[np.ndarray, np.ndarray]:
    scalar = _scalar(fmt)
    code_dtype, header = _CODE_DTYPES[scalar]
    if rep == _LIST:
        count = r.u32("entries.count")
        bits = _index_width(pool_size, fmt)
        need = _packed_len(count, bits) + header + count * code_dtype.itemsize
        if count > max_count or need > r.remaining:
            raise WireError(
                f"{what}: field entries.count: {count} entries ({need} bytes) exceed the limit "
                f"of {max_count} or the {r.remaining} bytes left"
            )
        packed = r.raw(_packed_len(count, bits), "entries.indices")
        indices = _unpack_indices(packed, count, bits, pool_size, what)
        return indices, _read_values(r, count, scalar, what)[1]
    if rep == _BITMASK:
        packed = r.raw(_packed_len(pool_size, 1), "entries.bitmask")
        stream = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little")
        if stream[pool_size:].any():
            raise WireError(
                f"{what}: field entries.bitmask: bits set beyond the pool of {pool_size}"
            )
        indices = np.flatnonzero(stream).astype(np.int64)
        if indices.size > max_count:
            raise WireError(
                f"{what}: field entries.bitmask: {indices.size} entries exceed the limit "
                f"of {max_count}"
            )
        values = _read_values(r, indices.size, scalar, what)[1]
    else:
        codes, dense = _read_values(r, pool_size, scalar, what)
        indices = np.flatnonzero(codes).astype(np.int64)  # zero bits: an absent entry
        if indices.size > max_count:
            raise WireError(
                f"{what}: field entries.values: {indices.size} entries exceed the limit "
                f"of {max_count}"
            )
        values = dense[indices]
    # A pool never carries zeros (see the module docstring), so a zero here is a
    # second encoding of "absent": refuse it rather than accept two spellings.
    if (values == 0).any():
        raise WireError(f"{what}: field entries.values: a present entry with value 0")
    return indices, values


def decode_entries(
    r: Reader, pool_size: int, fmt: EntryFormat, what: str, *, max_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read what :func:`encode_entries` wrote: (indices int64, values float64).

    ``max_count`` bounds the number of entries in any representation (a LIST's
    declared count before anything is read). A pool's zero entries never come back.
    """
    _check_pool(pool_size)
    if max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count}")
    try:
        tag = r.u8("entries.tag")
        rep = tag & (_ZSTD - 1)
        if rep not in _representations(fmt) or (tag & _ZSTD and not _compressed(fmt)):
            raise WireError(f"{what}: field entries.tag: tag {tag:#04x} is not valid for {fmt}")
        if not tag & _ZSTD:
            return _read_rep(r, rep, pool_size, fmt, what, max_count)
        bound = _body_bound(rep, pool_size, fmt, max_count)
        blob = r.blob("entries.zstd")
        body = Reader(decompress_bounded(blob, bound, what, "entries.zstd"), what)
        out = _read_rep(body, rep, pool_size, fmt, what, max_count)
        if body.remaining:
            raise WireError(
                f"{what}: field entries.zstd: {body.remaining} trailing bytes after the "
                f"{_REP_NAMES[rep]} section"
            )
        return out
    except WireError as e:
        # The caller's Reader may name its payload differently; always name `what`.
        if what in str(e):
            raise
        raise WireError(f"{what}: {e}") from None
