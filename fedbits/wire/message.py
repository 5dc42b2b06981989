"""The envelope every payload travels in, in both runtimes.

Layout (little-endian)::

    b"FB" | version u8 | direction u8 | method (u8 length + UTF-8) | round u32
    | body length u64 | body | CRC-32 of everything before it (u32)

The decoder checks, in order: the size limit (before reading anything else),
magic, version, the body length against the bytes present (truncation, trailing
garbage), the checksum, then direction, method and round. A bit flip anywhere is caught by the
CRC; a truncated or padded payload by the length fields.
"""

from __future__ import annotations

import struct
import zlib
from enum import IntEnum

from fedbits.errors import WireError
from fedbits.wire.codec import Reader, Writer

MAGIC = b"FB"
VERSION = 1
_TRAILER = 4


class Direction(IntEnum):
    DOWN = 0
    UP = 1


def encode_message(method: str, round_: int, direction: Direction, body: bytes) -> bytes:
    head = (
        Writer()
        .raw(MAGIC)
        .u8(VERSION)
        .u8(int(direction))
        .text(method)
        .u32(round_)
        .u64(len(body))
        .getvalue()
    )
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + body + struct.pack("<I", crc)


def header_size(method: str) -> int:
    """Bytes the envelope adds to a body: fixed for a given method name."""
    return len(encode_message(method, 0, Direction.DOWN, b""))


def decode_message(
    payload: bytes,
    *,
    method: str,
    round_: int,
    direction: Direction,
    max_bytes: int,
    sender: str = "payload",
) -> bytes:
    """Return the body of ``payload`` after checking every envelope field."""
    if len(payload) > max_bytes:
        raise WireError(f"{sender}: {len(payload)} bytes exceeds the limit of {max_bytes}")
    r = Reader(payload, sender)
    if r.raw(2, "magic") != MAGIC:
        raise WireError(f"{sender}: not a fedbits payload (bad magic)")
    version = r.u8("version")
    if version != VERSION:
        raise WireError(f"{sender}: unsupported wire version {version} (this build speaks {VERSION})")
    got_dir = r.u8("direction")
    got_method = r.text("method")
    got_round = r.u32("round")
    length = r.u64("body length")
    if length != r.remaining - _TRAILER:
        raise WireError(
            f"{sender}: body length {length} disagrees with the {max(r.remaining - _TRAILER, 0)} "
            "bytes present (truncated or trailing garbage)"
        )
    head_len = len(payload) - r.remaining
    body = r.raw(length, "body")
    crc = r.u32("checksum")
    r.finish()
    # The checksum first: a corrupted payload reads as corrupted, not as a wrong field.
    if zlib.crc32(payload[: head_len + length]) != crc:
        raise WireError(f"{sender}: checksum mismatch (corrupted payload)")
    if got_dir != int(direction):
        raise WireError(f"{sender}: direction {got_dir}, expected {int(direction)} ({direction.name})")
    if got_method != method:
        raise WireError(f"{sender}: payload is for method {got_method!r}, expected {method!r}")
    if got_round != round_:
        raise WireError(f"{sender}: payload is for round {got_round}, expected {round_}")
    return body
