"""The envelope the runtime puts around every method body, in both runtimes.

A method produces and consumes *bodies*; the runtime seals each body before it
crosses and opens it on the other side, so the checks every payload needs (whose
message it is, for which round and direction, whether it arrived intact, whether
it is too large) are written once here and cannot be forgotten by a method.

Layout (little-endian)::

    b"FB" | version u8 | direction u8 | method (u8 length + UTF-8) | round u32
    | body length u64 | body | CRC-32 of everything before it (u32)

:func:`open_envelope` checks, in order: the size limit (before reading anything
else), magic, version, the body length against the bytes present (truncation,
trailing garbage), the checksum, then direction, method and round. A bit flip
anywhere is caught by the CRC; a truncated or padded payload by the length fields.
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


def _check_size(size: int, limit: int, what: str) -> None:
    """Refuse a payload of ``size`` bytes over ``limit`` (``runtime.max_payload_mb``),
    naming it: "downlink to client 3: 32811 bytes exceeds the limit of 1000"."""
    if size > limit:
        raise WireError(f"{what}: {size} bytes exceeds the limit of {limit}")


def _head(method: str, round_: int, direction: Direction, body_len: int) -> bytes:
    return (
        Writer()
        .raw(MAGIC)
        .u8(VERSION)
        .u8(int(direction))
        .text(method)
        .u32(round_)
        .u64(body_len)
        .getvalue()
    )


def header_size(method: str) -> int:
    """Bytes the envelope adds to a body: fixed for a given method name."""
    return len(_head(method, 0, Direction.DOWN, 0)) + _TRAILER


def seal(
    method: str, round_: int, direction: Direction, body: bytes, *, limit: int, what: str
) -> bytes:
    """``body`` in its envelope; a payload over ``limit`` bytes is refused before it is
    built (its size is known from the body's), so an oversized one is never allocated."""
    _check_size(header_size(method) + len(body), limit, what)
    head = _head(method, round_, direction, len(body))
    crc = zlib.crc32(body, zlib.crc32(head))
    return b"".join((head, body, struct.pack("<I", crc)))  # one copy of the body


def open_envelope(
    payload: bytes, *, method: str, round_: int, direction: Direction, limit: int, what: str
) -> memoryview:
    """The body of ``payload`` after checking every envelope field; errors name ``what``
    (e.g. "client 3 uplink"). A read-only view, not a copy: the body of a FedAvg
    payload is the whole model, and the payload is held until the body is decoded."""
    _check_size(len(payload), limit, what)
    r = Reader(payload, what)
    if r.raw(2, "magic") != MAGIC:
        raise WireError(f"{what}: not a fedbits payload (bad magic)")
    version = r.u8("version")
    if version != VERSION:
        raise WireError(f"{what}: unsupported wire version {version} (this build speaks {VERSION})")
    got_dir = r.u8("direction")
    got_method = r.text("method")
    got_round = r.u32("round")
    length = r.u64("body length")
    if length != r.remaining - _TRAILER:
        raise WireError(
            f"{what}: body length {length} disagrees with the {max(r.remaining - _TRAILER, 0)} "
            "bytes present (truncated or trailing garbage)"
        )
    head_len = len(payload) - r.remaining
    body = r.view(length, "body")
    crc = r.u32("checksum")
    r.finish()
    # The checksum first: a corrupted payload reads as corrupted, not as a wrong field.
    if zlib.crc32(memoryview(payload)[: head_len + length]) != crc:
        raise WireError(f"{what}: checksum mismatch (corrupted payload)")
    if got_dir != int(direction):
        raise WireError(
            f"{what}: direction {got_dir}, expected {int(direction)} ({direction.name})"
        )
    if got_method != method:
        raise WireError(f"{what}: payload is for method {got_method!r}, expected {method!r}")
    if got_round != round_:
        raise WireError(f"{what}: payload is for round {got_round}, expected {round_}")
    return body
