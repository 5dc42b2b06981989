"""Messages of block-wise methods: opening an envelope, and a set of tensors whose
layout is chosen per message.

``_dense`` sends one fixed layout per run; a block-wise method sends a different
set of tensors depending on the client's block, so the layout is an argument here.
The format is the same as ``_dense``'s: the layout fingerprint (u64), then either
the flat values as one tensor in ``wire_dtype`` (no chain) or the chain's payload,
which runs to the end of the body.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedbits.compress import Chain, ErrorFeedback
from fedbits.methods.base import MethodContext
from fedbits.wire import Direction, Layout, Reader, Writer, decode_message
from fedbits.wire.layout import check_fingerprint, read_tensors, write_tensors


def open_message(
    ctx: MethodContext, payload: bytes, round_: int, direction: Direction, sender: str
) -> Reader:
    """A reader over the body, after every envelope check (size, checksum, method, round)."""
    body = decode_message(payload, method=ctx.cfg.method.name, round_=round_, direction=direction,
                          max_bytes=ctx.max_payload_bytes, sender=sender)
    return Reader(body, sender)


def segments(layout: Layout) -> list[int]:
    """Sizes of the layout's tensors, for per-tensor sparsifiers."""
    sizes = []
    for shape in layout.shapes:
        n = 1
        for d in shape:
            n *= d
        sizes.append(n)
    return sizes


def write_values(
    w: Writer, layout: Layout, tensors: Mapping[str, torch.Tensor], *, wire_dtype: torch.dtype,
    chain: Chain | None, generator: torch.Generator, feedback: ErrorFeedback | None = None,
) -> None:
    if chain is None:
        write_tensors(w, layout, tensors, wire_dtype)
        return
    flat = layout.flatten(tensors, torch.float32)
    sizes = segments(layout)
    if feedback is not None:
        payload = feedback.encode(chain, flat, segments=sizes, generator=generator)
    else:
        payload = chain.encode(flat, segments=sizes, generator=generator)
    w.u64(layout.fingerprint).raw(payload)


def read_values(
    r: Reader, layout: Layout, *, wire_dtype: torch.dtype, chain: Chain | None, field: str
) -> dict[str, torch.Tensor]:
    """The tensors (zeros where a sparse chain sent nothing); the reader must be at the
    fingerprint, and with a chain the payload must run to the end of the body."""
    if chain is None:
        return read_tensors(r, layout, wire_dtype, field)
    check_fingerprint(r.u64(f"{field}.fingerprint"), layout, field)
    flat = chain.decode(r.raw(r.remaining, field), numel=layout.numel,
                        segments=segments(layout), what=r.what)
    return layout.unflatten(flat)
