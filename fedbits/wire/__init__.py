"""Payload encoding/decoding (versioned, strict, bounded) and the byte ledger."""

from fedbits.wire.codec import Reader, Writer
from fedbits.wire.layout import Layout, read_tensors, write_tensors
from fedbits.wire.ledger import Ledger
from fedbits.wire.message import Direction, decode_message, encode_message, header_size

__all__ = [
    "Direction",
    "Layout",
    "Ledger",
    "Reader",
    "Writer",
    "decode_message",
    "encode_message",
    "header_size",
    "read_tensors",
    "write_tensors",
]
