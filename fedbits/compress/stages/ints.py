"""Values stages ``int8`` and ``int4``: integer codes with a float32 scale per block.

For c values in blocks of B (``block=N``, default 64)::

    format  bytes                      bound on |x − x̂|
    int8    4·ceil(c/B) + c            s/2, s = absmax(block)/127   (sr: < s, unbiased)
    int4    4·ceil(c/B) + ceil(c/2)    s/2, s = absmax(block)/7     (sr: < s, unbiased)

The scales come first, then the codes: int8 as bytes in [-127, 127], int4 as nibbles
in [-7, 7] (two's complement, two per byte, low nibble first, a final odd nibble 0).
The scale is rounded up so that no code needs clamping (capped where q·s would
overflow, for a block holding values within rounding of ±3.4e38) and floored at the
smallest float32 (2^-149) for a non-zero block. Nearest rounding (ties to even)
gives the s/2 bound; stochastic rounding (``sr``) rounds up with probability equal
to the fractional part, so E[x̂] = x and the error stays below s. Both bounds hold up
to float32 rounding of x/s and q·s, at most 2^-23·|x| + 2^-149 more.

The decoder refuses what no encoder writes: scales that are negative, not finite or
large enough for q·s to overflow, the codes -128 and -8, a set padding nibble. So
every value it returns is finite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedbits.compress.codec import Buffer
from fedbits.compress.options import flag_option, int_option, parse_options
from fedbits.compress.registry import register_stage
from fedbits.errors import WireError

IntName = Literal["int8", "int4"]
DEFAULT_BLOCK = 64
MAX_BLOCK = 1 << 20
_QMAX = {"int8": 127, "int4": 7}
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


@dataclass(frozen=True)
class IntValues:
    """Blockwise integer quantisation; ``stochastic`` is ``sr``."""

    name: IntName
    block: int = DEFAULT_BLOCK
    stochastic: bool = False

    @property
    def spec(self) -> str:
        return f"{self.name}:block={self.block}" + (",sr" if self.stochastic else "")

    @property
    def wire_params(self) -> str:
        return f"block={self.block}"  # sr changes the encoder's rounding, not the format

    def __str__(self) -> str:
        return self.spec

    def _blocks(self, count: int) -> int:
        return -(-count // self.block)

    def nbytes(self, count: int) -> int:
        codes = count if self.name == "int8" else -(-count // 2)
        return _SCALE_BYTES * self._blocks(count) + codes

    def encode(self, values: torch.Tensor, generator: torch.Generator | None) -> list[Buffer]:
        scale, raw = self._quantise(values.numpy(), generator)
        if self.name == "int4":
            nibbles = raw.view(np.uint8) & 0x0F
            if nibbles.size % 2:
                nibbles = np.append(nibbles, np.uint8(0))
            raw = nibbles[0::2] | (nibbles[1::2] << 4)
        return [scale, raw]

    def decode(self, data: memoryview, count: int, what: str) -> torch.Tensor:
        scale_bytes = _SCALE_BYTES * self._blocks(count)
        scale = np.frombuffer(data[:scale_bytes], "<f4")
        if not ((scale >= 0) & (scale <= _MAX_SCALE[self.name])).all():  # NaN fails too
            raise WireError(
                f"{what}: field values.scales: a scale is negative, too large or not finite"
            )
        if self.name == "int8":
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
        values = _blocked(codes.astype(np.float32), self.block) * scale.astype(np.float32)[:, None]
        return torch.from_numpy(values.reshape(-1)[:count])

    def _quantise(
        self, v: np.ndarray, generator: torch.Generator | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(float32 scale per block, int8 codes per value); numpy, which beats torch's
        CPU kernels on these elementwise passes by 2-4x."""
        qmax = _QMAX[self.name]
        blocks = _blocked(v, self.block)
        absmax = np.maximum(blocks.max(axis=1, initial=0), -blocks.min(axis=1, initial=0))
        scale = absmax / np.float32(qmax)
        # Round the scale up where float32 rounded it down, so |x / s| <= qmax exactly.
        with np.errstate(over="ignore"):  # near 3.4e38 the product is inf: no bump needed
            low = scale * np.float32(qmax) < absmax
        scale[low] = np.nextafter(scale[low], np.float32(np.inf))
        # ... but never so far that qmax·s overflows (a block holding ±3.4e38): there
        # the code clamps, off by float32 rounding only.
        scale = np.minimum(scale, _MAX_SCALE[self.name])
        scale = np.where(absmax > 0, np.maximum(scale, _SMALLEST), np.float32(0))
        steps = blocks / np.maximum(scale, _SMALLEST)[:, None]  # an all-zero block stays zero
        if self.stochastic:
            if generator is None:
                raise ValueError(f"{self} (stochastic rounding) needs a torch.Generator")
            noise = torch.rand(steps.shape, generator=generator).numpy()
            codes = np.floor(steps + noise, out=steps)
        else:
            codes = np.rint(steps, out=steps)  # ties to even
        np.clip(codes, -qmax, qmax, out=codes)
        return scale, codes.astype(np.int8).reshape(-1)[: v.size]


def _blocked(v: np.ndarray, block: int) -> np.ndarray:
    """``v`` zero-padded to whole blocks, as (blocks, block)."""
    pad = -(-v.size // block) * block - v.size
    return (np.pad(v, (0, pad)) if pad else v).reshape(-1, block)


def _factory(name: IntName) -> Callable[[str | None], IntValues]:
    def parse(argument: str | None) -> IntValues:
        opts = parse_options(argument, {"block", "sr"})
        sr = flag_option(opts, "sr")
        return IntValues(name, int_option(opts, "block", DEFAULT_BLOCK, 1, MAX_BLOCK), sr)

    return parse


_NAMES: tuple[IntName, ...] = ("int8", "int4")
for _name in _NAMES:
    register_stage(_name, _factory(_name), role="values", usage=f"{_name}[:block=N][,sr]")
