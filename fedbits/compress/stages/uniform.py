"""Values stage ``uniform``: min-max (affine) quantisation at any bit width 1-8.

Ro et al. (2022) study client-to-server updates quantised uniformly at many bit
widths; ``int8`` and ``int4`` are symmetric and stop at two widths. Here each block of
B values (``block=N``, default 64) gets an offset ``lo`` (its minimum) and a step
``s = (max − lo) / (2^bits − 1)``; a value travels as the code
``q ∈ [0, 2^bits − 1]`` and comes back as ``lo + q·s``. Affine rather than symmetric,
so a block whose values share a sign spends no code on the other sign, and 1 bit
still has two levels (min and max). For c values::

    bytes = 8·ceil(c/B) + ceil(c·bits/8)
    bound on |x − x̂|:  s/2 (nearest, ties to even);  < s with ``sr``, unbiased

Wire: every block's offset (float32), then every block's step (float32), then the
codes packed ``bits`` to a value, least significant bit first, the last byte's unused
bits zero. The step is rounded up so that ``lo + L·s`` reaches the block's maximum
(no code clamps), and capped so that ``lo + L·s`` stays a finite float32 (only a
block spanning more than float32's range clamps). Reconstruction is computed in
float64 and rounded once to float32 on both sides, so the bounds hold up to that
rounding (2^-24·|x̂|). Stochastic rounding (``sr``) rounds up with probability equal
to the fractional part of ``(x − lo)/s``, so E[x̂] = x.

The decoder refuses what no encoder writes: an offset or step that is not finite, a
negative step, ``lo + L·s`` beyond float32's range, a non-zero code in a block of
step 0 (a constant block is all code 0), a set padding bit. Every packed code lies in
[0, 2^bits − 1] by construction, so every value it returns is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedbits.compress.codec import Buffer, StageError
from fedbits.compress.options import flag_option, int_option, parse_options
from fedbits.compress.registry import register_stage
from fedbits.errors import WireError

DEFAULT_BLOCK = 64
MAX_BLOCK = 1 << 20
MAX_BITS = 8
_F32_MAX = float(np.finfo(np.float32).max)
_HEAD_BYTES = 8  # offset and step, float32 each, per block


@dataclass(frozen=True)
class UniformValues:
    """Blockwise min-max quantisation to ``bits`` bits; ``stochastic`` is ``sr``."""

    bits: int
    block: int = DEFAULT_BLOCK
    stochastic: bool = False
    name: str = "uniform"

    @property
    def levels(self) -> int:
        """L = 2^bits − 1, the largest code."""
        return (1 << self.bits) - 1

    @property
    def spec(self) -> str:
        return f"uniform:{self.wire_params}" + (",sr" if self.stochastic else "")

    @property
    def wire_params(self) -> str:
        return f"bits={self.bits},block={self.block}"  # sr is the encoder's choice only

    def __str__(self) -> str:
        return self.spec

    def _blocks(self, count: int) -> int:
        return -(-count // self.block)

    def nbytes(self, count: int) -> int:
        return _HEAD_BYTES * self._blocks(count) + -(-count * self.bits // 8)

    def encode(self, values: torch.Tensor, generator: torch.Generator | None) -> list[Buffer]:
        v = values.numpy()
        if v.size == 0:
            return []
        # edge padding: the last block's min and max are those of its real values
        pad = self._blocks(v.size) * self.block - v.size
        blocks = np.pad(v, (0, pad), mode="edge").reshape(-1, self.block).astype(np.float64)
        lo = blocks.min(axis=1)
        step = self._steps(lo, blocks.max(axis=1))
        steps = (blocks - lo[:, None]) / np.where(step > 0, step, 1.0)[:, None]
        if self.stochastic:
            if generator is None:
                raise ValueError(f"{self} (stochastic rounding) needs a torch.Generator")
            noise = torch.rand(steps.shape, generator=generator, dtype=torch.float64).numpy()
            codes = np.floor(steps + noise, out=steps)
        else:
            codes = np.rint(steps, out=steps)
        np.clip(codes, 0, self.levels, out=codes)
        q = codes.astype(np.uint8).reshape(-1)[: v.size]
        return [lo.astype("<f4"), step.astype("<f4"), _pack(q, self.bits)]

    def _steps(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """float32 steps (as float64) with lo + L·s >= hi, and lo + L·s a finite float32."""
        top = self.levels
        step = ((hi - lo) / top).astype(np.float32)
        short = lo + top * step.astype(np.float64) < hi
        step[short] = np.nextafter(step[short], np.float32(np.inf))
        cap = ((_F32_MAX - lo) / top).astype(np.float32)  # may round up past the limit
        over = lo + top * cap.astype(np.float64) > _F32_MAX
        cap[over] = np.nextafter(cap[over], np.float32(0))
        return np.minimum(step, cap).astype(np.float64)

    def decode(self, data: memoryview, count: int, what: str) -> torch.Tensor:
        blocks = self._blocks(count)
        lo = np.frombuffer(data[: 4 * blocks], "<f4").astype(np.float64)
        step = np.frombuffer(data[4 * blocks : _HEAD_BYTES * blocks], "<f4").astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            top = lo + self.levels * step
        # NaN fails every comparison, so it is refused too
        if not (np.isfinite(lo).all() and (step >= 0).all() and (np.abs(top) <= _F32_MAX).all()):
            raise WireError(f"{what}: field values.scales: an offset or step is not finite, "
                            "negative, or reaches beyond float32")
        q = _unpack(data[_HEAD_BYTES * blocks :], count, self.bits, what)
        padded = np.zeros(blocks * self.block, dtype=np.float64)
        padded[:count] = q
        grid = padded.reshape(blocks, self.block)
        if (grid[step == 0] != 0).any():
            raise WireError(f"{what}: field values.codes: a non-zero code in a constant block")
        out = (lo[:, None] + grid * step[:, None]).reshape(-1)[:count]
        return torch.from_numpy(out.astype(np.float32))


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``bits`` bits per code, least significant first, into bytes (zero padding)."""
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def _unpack(data: memoryview, count: int, bits: int, what: str) -> np.ndarray:
    """The codes :func:`_pack` wrote; WireError when a padding bit is set."""
    flat = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    if flat[count * bits :].any():
        raise WireError(f"{what}: field values.codes: a padding bit is set")
    planes = flat[: count * bits].reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint16)


def parse(argument: str | None) -> UniformValues:
    opts = parse_options(argument, {"bits", "block", "sr"})
    if "bits" not in opts:
        raise StageError(f"uniform needs bits=N, N in [1, {MAX_BITS}]")
    return UniformValues(int_option(opts, "bits", 0, 1, MAX_BITS),
                         int_option(opts, "block", DEFAULT_BLOCK, 1, MAX_BLOCK),
                         flag_option(opts, "sr"))


register_stage("uniform", parse, role="values", usage="uniform:bits=N[,block=N][,sr]")
