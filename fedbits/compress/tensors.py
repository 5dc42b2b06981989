"""A set of model tensors in a message body: how every delta-based method sends
weights down and changes up (``_dense``'s one layout per run, ``_blocks``' layout
per block).

    layout fingerprint u64 | values

The values are one flat tensor in the plain ``wire_dtype`` (dtype code, count,
values: :meth:`fedbits.wire.Writer.tensor`) when the direction has no codec chain,
else the chain's payload, which runs to the end of the body. Names and shapes are
not sent: both sides build the layout from the same model, and the fingerprint
refuses a payload for another one (:mod:`fedbits.wire.layout`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

from fedbits.compress.chain import Chain
from fedbits.compress.feedback import ErrorFeedback
from fedbits.wire import Layout, Reader, Writer
from fedbits.wire.layout import check_fingerprint, read_tensors, write_tensors


class Received(NamedTuple):
    """Decoded tensors, zero where a sparse chain sent nothing, and for a sparse chain
    the flat positions that were sent (None for a dense one)."""

    tensors: dict[str, torch.Tensor]
    positions: torch.Tensor | None


def segments(layout: Layout) -> list[int]:
    """Sizes of the layout's tensors, for per-tensor sparsifiers."""
    return [math.prod(shape) for shape in layout.shapes]


def write_values(
    w: Writer, layout: Layout, tensors: Mapping[str, torch.Tensor], *, wire_dtype: torch.dtype,
    chain: Chain | None, generator: torch.Generator, feedback: ErrorFeedback | None = None,
) -> None:
    """Append ``tensors`` (in ``layout``'s order); with ``feedback``, what the chain
    drops is kept for the next call."""
    if chain is None:
        write_tensors(w, layout, dict(tensors), wire_dtype)
        return
    flat = layout.flatten(dict(tensors), torch.float32).cpu()  # codecs run at the wire
    sizes = segments(layout)
    if feedback is not None:
        payload = feedback.encode(chain, flat, segments=sizes, generator=generator)
    else:
        payload = chain.encode(flat, segments=sizes, generator=generator)
    w.u64(layout.fingerprint).raw(payload)


def read_values(
    r: Reader, layout: Layout, *, wire_dtype: torch.dtype, chain: Chain | None, field: str
) -> Received:
    """What :func:`write_values` wrote; the reader must be at the fingerprint, and with
    a chain the payload must run to the end of the body."""
    if chain is None:
        return Received(read_tensors(r, layout, wire_dtype, field), None)
    check_fingerprint(r.u64(f"{field}.fingerprint"), layout, field)
    payload = r.raw(r.remaining, field)
    sizes = segments(layout)
    if not chain.is_sparse:
        flat = chain.decode(payload, numel=layout.numel, segments=sizes, what=r.what)
        return Received(layout.unflatten(flat), None)
    positions, values = chain.decode_sparse(
        payload, numel=layout.numel, segments=sizes, what=r.what
    )
    out = np.zeros(layout.numel, dtype=np.float32)  # numpy: lazily zeroed
    out[positions.numpy()] = values.numpy()
    return Received(layout.unflatten(torch.from_numpy(out)), positions)
