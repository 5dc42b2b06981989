"""Bodies of block-wise methods: a set of tensors whose layout is chosen per message.

``_dense`` sends one fixed layout per run; a block-wise method sends a different
set of tensors depending on the client's block, so the layout is an argument here.
The tensors travel exactly as ``_dense``'s do, through the same codec layer
(:mod:`fedbits.compress.tensors`): the layout fingerprint, then the plain values or
the chain's payload.
"""

from __future__ import annotations

import torch

from fedbits.compress import Chain
from fedbits.compress.tensors import read_values as _read_values
from fedbits.compress.tensors import segments, write_values
from fedbits.wire import Layout, Reader

__all__ = ["read_values", "segments", "write_values"]


def read_values(
    r: Reader, layout: Layout, *, wire_dtype: torch.dtype, chain: Chain | None, field: str
) -> dict[str, torch.Tensor]:
    """The tensors (zeros where a sparse chain sent nothing): block-wise methods train
    every position of their block, so which positions were sent does not matter here."""
    return _read_values(r, layout, wire_dtype=wire_dtype, chain=chain, field=field).tensors
