"""Payload encoding/decoding (versioned, strict, bounded) and the byte ledger.

Methods write and read their bodies with :class:`Writer`/:class:`Reader` and
:func:`write_tensors`/:func:`read_tensors`; the runtime alone seals and opens the
envelope (:mod:`.envelope`) and records the ledger.
"""

from fedbits.wire.codec import Body, Reader, Writer
from fedbits.wire.envelope import Direction, header_size, open_envelope, seal
from fedbits.wire.layout import Layout, read_tensors, write_tensors
from fedbits.wire.ledger import Ledger

__all__ = [
    "Body",
    "Direction",
    "Layout",
    "Ledger",
    "Reader",
    "Writer",
    "header_size",
    "open_envelope",
    "read_tensors",
    "seal",
    "write_tensors",
]
