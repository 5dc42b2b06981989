"""Messages of block-wise methods: opening an envelope, and a set of tensors whose
layout is chosen per message.

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
from fedbits.methods.base import MethodContext
from fedbits.wire import Direction, Layout, Reader, decode_message

__all__ = ["open_message", "read_values", "segments", "write_values"]


def open_message(
    ctx: MethodContext, payload: bytes, round_: int, direction: Direction, sender: str
) -> Reader:
    """A reader over the body, after every envelope check (size, checksum, method, round)."""
    body = decode_message(payload, method=ctx.cfg.method.name, round_=round_, direction=direction,
                          max_bytes=ctx.max_payload_bytes, sender=sender)
    return Reader(body, sender)


def read_values(
    r: Reader, layout: Layout, *, wire_dtype: torch.dtype, chain: Chain | None, field: str
) -> dict[str, torch.Tensor]:
    """The tensors (zeros where a sparse chain sent nothing): block-wise methods train
    every position of their block, so which positions were sent does not matter here."""
    return _read_values(r, layout, wire_dtype=wire_dtype, chain=chain, field=field).tensors
