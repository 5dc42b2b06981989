"""Value formats: how the values that travel are written, and how close they come back.

For a value x and what the receiver reconstructs, x̂ (c values, block size B)::

    format  bytes                      bound on |x − x̂|
    fp32    4c                         0 (exact)
    fp16    2c                         2^-11·|x| for |x| >= 2^-14, else 2^-25;
                                       |x| > 65504 is refused (ValueError), never inf
    bf16    2c                         2^-8·|x| for |x| >= 2^-126, else 2^-134;
                                       a value that rounds past 3.39e38 is refused
    int8    4·ceil(c/B) + c            s/2, s = absmax(block)/127   (sr: < s, unbiased)
    int4    4·ceil(c/B) + ceil(c/2)    s/2, s = absmax(block)/7     (sr: < s, unbiased)

Integer formats cut the values into blocks of B (default 64) and send one float32
scale per block, then the codes: int8 as bytes in [-127, 127], int4 as nibbles in
[-7, 7] (two's complement, two per byte, low nibble first, a final odd nibble 0).
The scale is rounded up so that no code needs clamping (capped where q·s would
overflow, for a block holding values within rounding of ±3.4e38) and floored at the
smallest float32 (2^-149) for a non-zero block. Nearest rounding (ties to even)
gives the s/2 bound; stochastic rounding (``sr``) rounds up with probability equal
to the fractional part, so E[x̂] = x and the error stays below s. Both bounds hold up
to float32 rounding of x/s and q·s, at most 2^-23·|x| + 2^-149 more.

The decoder refuses what no encoder writes: non-finite values, scales that are
negative, not finite or large enough for q·s to overflow, the codes -128 and -8, a
set padding nibble. So every tensor it returns is finite.
"""

from __future__ import annotations

import numpy as np
import torch

from fedbits.compress.stages import ValueFormat
from fedbits.errors import WireError

FP16_MAX = 65504.0
_QMAX = {"int8": 127, "int4": 7}
_WIDTH = {"fp32": 4, "fp16": 2, "bf16": 2}
_SMALLEST = np.float32(2.0**-149)  # the least positive float32
_SCALE_BYTES = 4


def _max_scale(qmax: int) -> np.float32:
    """The largest scale whose qmax·scale is still a finite float32."""
    scale = np.float32(np.finfo(np.float32).max) / np.float32(qmax)
    with np.errstate(over="ignore"):
        while not np.isfinite(scale * np.float32(qmax)):
            scale = np.nextafter(scale, np.float32(0))
    return scale


_MAX_SCALE = {name: _max_scale(qmax) for name, qmax in _QMAX.items()}


def _blocks(count: int, block: int) -> int:
    return -(-count // block)


def value_bytes(fmt: ValueFormat, count: int) -> int:
    """Exact size of ``count`` values in ``fmt``."""
    if not fmt.is_int:
        return _WIDTH[fmt.name] * count
    codes = count if fmt.name == "int8" else -(-count // 2)
    return _SCALE_BYTES * _blocks(count, fmt.block) + codes


def _blocked(v: np.ndarray, block: int) -> np.ndarray:
    """``v`` zero-padded to whole blocks, as (blocks, block)."""
    pad = _blocks(v.size, block) * block - v.size
    return (np.pad(v, (0, pad)) if pad else v).reshape(-1, block)


def _quantise(
    v: np.ndarray, fmt: ValueFormat, generator: torch.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale per block, int8 codes per value); numpy, which beats torch's
    CPU kernels on these elementwise passes by 2-4x."""
    qmax = _QMAX[fmt.name]
    blocks = _blocked(v, fmt.block)
    absmax = np.maximum(blocks.max(axis=1, initial=0), -blocks.min(axis=1, initial=0))
    scale = absmax / np.float32(qmax)
    # Round the scale up where float32 rounded it down, so |x / s| <= qmax exactly.
    with np.errstate(over="ignore"):  # near 3.4e38 the product is inf: no bump needed
        low = scale * np.float32(qmax) < absmax
    scale[low] = np.nextafter(scale[low], np.float32(np.inf))
    # ... but never so far that qmax·s overflows (a block holding ±3.4e38): there
    # the code clamps, off by float32 rounding only.
    scale = np.minimum(scale, _MAX_SCALE[fmt.name])
    scale = np.where(absmax > 0, np.maximum(scale, _SMALLEST), np.float32(0))
    steps = blocks / np.maximum(scale, _SMALLEST)[:, None]  # an all-zero block stays zero
    if fmt.stochastic:
        if generator is None:
            raise ValueError(f"{fmt} (stochastic rounding) needs a torch.Generator")
        noise = torch.rand(steps.shape, generator=generator).numpy()
        codes = np.floor(steps + noise, out=steps)
    else:
        codes = np.rint(steps, out=steps)  # ties to even
    np.clip(codes, -qmax, qmax, out=codes)
    return scale, codes.astype(np.int8).reshape(-1)[: v.size]


def _dequantise(scale: np.ndarray, codes: np.ndarray, block: int) -> torch.Tensor:
    """The float32 values that integer codes and per-block scales stand for."""
    values = _blocked(codes.astype(np.float32), block) * scale[:, None]
    return torch.from_numpy(values.reshape(-1)[: codes.size])


def encode_values(
    fmt: ValueFormat, v: torch.Tensor, generator: torch.Generator | None
) -> list[np.ndarray]:
    """The wire buffers for finite float32 values ``v`` (ValueError if they overflow)."""
    if fmt.name == "fp32":
        return [v.numpy()]
    if fmt.name == "fp16":
        if _peak(v) > FP16_MAX:
            raise ValueError(
                f"values up to {_peak(v):g} overflow fp16 (max {FP16_MAX:g}); use bf16 or int8"
            )
        return [v.to(torch.float16).numpy()]
    if fmt.name == "bf16":
        if torch.isinf(torch.tensor(_peak(v)).to(torch.bfloat16)):  # rounding is monotonic
            raise ValueError(f"values up to {_peak(v):g} overflow bf16 (max 3.39e38)")
        return [v.to(torch.bfloat16).view(torch.int16).numpy()]
    scale, raw = _quantise(v.numpy(), fmt, generator)
    if fmt.name == "int4":
        nibbles = raw.view(np.uint8) & 0x0F
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        raw = nibbles[0::2] | (nibbles[1::2] << 4)
    return [scale, raw]


def _peak(v: torch.Tensor) -> float:
    """max |v| (0 for no values), without materialising |v|."""
    a = v.numpy()
    return max(-float(a.min()), float(a.max())) if a.size else 0.0


def _finite(values: np.ndarray, what: str, field: str) -> torch.Tensor:
    if not np.isfinite(values).all():
        raise WireError(f"{what}: field {field}: non-finite value")
    return torch.from_numpy(values)


def decode_values(fmt: ValueFormat, data: memoryview, count: int, what: str) -> torch.Tensor:
    """Decode ``count`` values from ``data``, exactly the bytes :func:`encode_values`
    wrote (read in place, not copied first): float32, shape (count,)."""
    if len(data) != value_bytes(fmt, count):
        raise WireError(
            f"{what}: field values: {len(data)} bytes, but {count} values in {fmt} take "
            f"{value_bytes(fmt, count)}"
        )
    if fmt.name == "fp32":
        return _finite(np.frombuffer(data, "<f4").astype(np.float32), what, "values")
    if fmt.name == "fp16":
        return _finite(np.frombuffer(data, "<f2").astype(np.float32), what, "values")
    if fmt.name == "bf16":
        bits = np.frombuffer(data, "<u2").astype(np.uint32) << 16
        return _finite(bits.view(np.float32), what, "values")
    scale_bytes = _SCALE_BYTES * _blocks(count, fmt.block)
    scale = np.frombuffer(data[:scale_bytes], "<f4")
    if not ((scale >= 0) & (scale <= _MAX_SCALE[fmt.name])).all():  # NaN fails too
        raise WireError(
            f"{what}: field values.scales: a scale is negative, too large or not finite"
        )
    if fmt.name == "int8":
        codes = np.frombuffer(data[scale_bytes:], np.int8)
        if (codes == -128).any():
            raise WireError(f"{what}: field values.codes: int8 code -128 is never written")
    else:
        packed = np.frombuffer(data[scale_bytes:], np.uint8)
        nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)
        if nibbles[count:].any():
            raise WireError(f"{what}: field values.codes: the padding nibble is set")
        nibbles = nibbles[:count]
        if (nibbles == 8).any():
            raise WireError(f"{what}: field values.codes: int4 code -8 is never written")
        codes = (nibbles ^ 8).astype(np.int8) - np.int8(8)
    return _dequantise(scale.astype(np.float32), codes, fmt.block)
