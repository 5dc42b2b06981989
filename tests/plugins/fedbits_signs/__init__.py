"""``sign1``: 1-bit signs with a float32 scale per block, a fedbits values stage.

Each value travels as its sign; each block of B values (``sign1:block=N``, default
64) as one float32 scale, the mean |x| of the block, so the receiver gets
sign(x) · mean|x| (signSGD with a scale). For c values: ceil(c/8) + 4·ceil(c/B) bytes,
1.5 bits per value at B = 64. The block size decides how bytes are read, so it is in
the chain fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedbits.compress import Buffer, int_option, parse_options, register_stage
from fedbits.errors import WireError

DEFAULT_BLOCK = 64


@dataclass(frozen=True)
class Signs:
    block: int = DEFAULT_BLOCK
    name = "sign1"

    @property
    def spec(self) -> str:
        return f"sign1:{self.wire_params}"

    @property
    def wire_params(self) -> str:
        return f"block={self.block}"

    def _blocks(self, count: int) -> int:
        return -(-count // self.block)

    def nbytes(self, count: int) -> int:
        return 4 * self._blocks(count) + -(-count // 8)

    def encode(self, values: torch.Tensor, generator: torch.Generator | None) -> list[Buffer]:
        v = values.numpy()
        blocks = self._blocks(v.size)
        magnitude = np.zeros(blocks * self.block)
        magnitude[: v.size] = np.abs(v)
        sizes = np.full(blocks, self.block)
        if blocks:
            sizes[-1] = v.size - self.block * (blocks - 1)  # the last block may be short
        scale = magnitude.reshape(blocks, self.block).sum(axis=1) / sizes
        signs = np.packbits(v < 0, bitorder="little")
        return [scale.astype("<f4"), signs]

    def decode(self, data: memoryview, count: int, what: str) -> torch.Tensor:
        # The chain has checked len(data) == nbytes(count): nothing here can be too big.
        scale_bytes = 4 * self._blocks(count)
        scale = np.frombuffer(data[:scale_bytes], "<f4")
        if not (np.isfinite(scale) & (scale >= 0)).all():
            raise WireError(f"{what}: field values.scales: a scale is negative or not finite")
        negative = np.unpackbits(np.frombuffer(data[scale_bytes:], np.uint8), bitorder="little")
        if negative[count:].any():
            raise WireError(f"{what}: field values.signs: padding bits are set")
        magnitude = np.repeat(scale.astype(np.float32), self.block)[:count]
        return torch.from_numpy(np.where(negative[:count] == 1, -magnitude, magnitude))


def parse(argument: str | None) -> Signs:
    opts = parse_options(argument, {"block"})
    return Signs(int_option(opts, "block", DEFAULT_BLOCK, 1, 1 << 20))


register_stage("sign1", parse, role="values", usage="sign1[:block=N]")
