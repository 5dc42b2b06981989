"""Dense tensor sets on the wire without names or shapes.

Both sides build the same model, so they agree on which tensors travel and their
shapes. Sending names and shapes would cost bytes every round; instead a payload
carries a 64-bit fingerprint of the layout, and the receiver refuses a payload whose
fingerprint or value count differs from its own layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from fedbits.errors import WireError
from fedbits.wire.codec import Reader, Writer


@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()))

    @cached_property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    @cached_property
    def fingerprint(self) -> int:
        h = hashlib.sha256()
        for name, shape in zip(self.names, self.shapes, strict=True):
            h.update(f"{name}:{','.join(map(str, shape))};".encode())
        return int.from_bytes(h.digest()[:8], "little")

    def check_names(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if tuple(tensors) != self.names:
            raise WireError("tensor set does not match the layout (names or order differ)")

    def flatten(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        self.check_names(tensors)
        return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors.values()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = 1
            for d in shape:
                n *= d
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out


def write_tensors(
    w: Writer, layout: Layout, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Fingerprint (u64) then all values, flattened in layout order, as one tensor."""
    layout.check_names(tensors)
    w.u64(layout.fingerprint).tensors_as_one(tensors.values(), dtype)


def check_fingerprint(fp: int, layout: Layout, field: str) -> None:
    if fp != layout.fingerprint:
        raise WireError(
            f"{field}: layout fingerprint {fp:#x} differs from this side's {layout.fingerprint:#x} "
            "(different model, LoRA settings or method options)"
        )


def read_tensors(
    r: Reader, layout: Layout, dtype: torch.dtype, field: str = "tensors"
) -> dict[str, torch.Tensor]:
    check_fingerprint(r.u64(field + ".fingerprint"), layout, field)
    flat = r.tensor(field, count=layout.numel, dtype=dtype)
    return layout.unflatten(flat)
