"""Values stages ``fp32``, ``fp16`` and ``bf16``: one IEEE code per value.

For a value x and what the receiver reconstructs, x̂ (c values)::

    format  bytes   bound on |x − x̂|
    fp32    4c      0 (exact)
    fp16    2c      2^-11·|x| for |x| >= 2^-14, else 2^-25;
                    |x| > 65504 is refused (ValueError), never inf
    bf16    2c      2^-8·|x| for |x| >= 2^-126, else 2^-134;
                    a value that rounds past 3.39e38 is refused

Both conversions round to nearest, ties to even. :meth:`FloatValues.codes` and
:meth:`FloatValues.values` are the element coding alone (one code per value, no
framing), which FedKSeed's entry coding shares for its float32 and bfloat16 scalars.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedbits.compress.codec import Buffer
from fedbits.compress.options import no_options
from fedbits.compress.registry import register_stage

FloatName = Literal["fp32", "fp16", "bf16"]
FP16_MAX = 65504.0
_CODE_DTYPES: dict[str, np.dtype] = {
    "fp32": np.dtype("<f4"),
    "fp16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),  # the upper half of a float32 bit pattern
}


@dataclass(frozen=True)
class FloatValues:
    """Every value as one float32, float16 or bfloat16 code."""

    name: FloatName

    @property
    def spec(self) -> str:
        return self.name

    @property
    def wire_params(self) -> str:
        return ""

    def __str__(self) -> str:
        return self.spec

    @property
    def code_dtype(self) -> np.dtype:
        """The little-endian numpy dtype of one code."""
        return _CODE_DTYPES[self.name]

    def nbytes(self, count: int) -> int:
        return self.code_dtype.itemsize * count

    def codes(self, v: torch.Tensor) -> np.ndarray:
        """One code per finite float32 value (ValueError where the format overflows)."""
        if self.name == "fp32":
            return v.numpy()
        peak = _peak(v)
        if self.name == "fp16":
            if peak > FP16_MAX:
                raise ValueError(
                    f"values up to {peak:g} overflow fp16 (max {FP16_MAX:g}); use bf16 or int8"
                )
            return v.to(torch.float16).numpy()
        if torch.isinf(torch.tensor(peak).to(torch.bfloat16)):  # rounding is monotonic
            raise ValueError(f"values up to {peak:g} overflow bf16 (max 3.39e38)")
        return v.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    def values(self, codes: np.ndarray) -> torch.Tensor:
        """The float32 values codes stand for (a copy; not checked for finiteness)."""
        if self.name == "bf16":
            bits = codes.view(np.uint16).astype(np.uint32) << 16
            return torch.from_numpy(bits.view(np.float32))
        return torch.from_numpy(codes.astype(np.float32))

    def encode(self, values: torch.Tensor, generator: torch.Generator | None) -> list[Buffer]:
        return [self.codes(values)]

    def decode(self, data: memoryview, count: int, what: str) -> torch.Tensor:
        return self.values(np.frombuffer(data, self.code_dtype, count))


def _peak(v: torch.Tensor) -> float:
    """max |v| (0 for no values), without materialising |v|."""
    a = v.numpy()
    return max(-float(a.min()), float(a.max())) if a.size else 0.0


def _factory(name: FloatName) -> Callable[[str | None], FloatValues]:
    def parse(argument: str | None) -> FloatValues:
        no_options(name, argument)
        return FloatValues(name)

    return parse


_NAMES: tuple[FloatName, ...] = ("fp32", "fp16", "bf16")
for _name in _NAMES:
    register_stage(_name, _factory(_name), role="values")
