"""Bytes stage ``zstd``: zstandard over the body, kept only when it is smaller.

On the wire: u8 coding (0 raw, 1 zstd) | the body, raw or as one zstd frame. It pays
on quantised values (int8/int4 codes from a peaked distribution, zeros) and on
clustered indices; on random float32 values it mostly cannot, and the raw body is
sent for one byte more. The level changes speed and size, not how bytes are read,
so it is not part of the chain fingerprint.

:class:`Zstd`'s ``compress`` and :func:`decompress_bounded` are the compression
alone, which FedKSeed's entry coding shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard

from fedbits.compress.codec import Buffer
from fedbits.compress.options import int_option, parse_options
from fedbits.compress.registry import register_stage
from fedbits.errors import WireError

DEFAULT_LEVEL = 3
MAX_LEVEL = 22
_RAW, _ZSTD = 0, 1


@dataclass(frozen=True)
class Zstd:
    """Entropy-code the body at ``level`` (1-22)."""

    level: int = DEFAULT_LEVEL
    name = "zstd"

    @property
    def spec(self) -> str:
        return f"zstd:level={self.level}"

    @property
    def wire_params(self) -> str:
        return ""

    def __str__(self) -> str:
        return self.spec

    def compress(self, data: bytes) -> bytes:
        """One zstd frame holding ``data`` (its size declared, for bounded decoding)."""
        return zstandard.ZstdCompressor(level=self.level).compress(data)

    def max_bytes(self, size: int) -> int:
        return 1 + size  # the raw body is kept whenever compression does not pay

    def encode(self, data: bytes) -> list[Buffer]:
        packed = self.compress(data)
        if len(packed) < len(data):
            return [bytes([_ZSTD]), packed]
        return [bytes([_RAW]), data]

    def decode(self, data: memoryview, bound: int, what: str) -> Buffer:
        if not len(data):
            raise WireError(f"{what}: field body_coding: missing")
        coding, body = data[0], data[1:]
        if coding == _ZSTD:
            return decompress_bounded(body, bound, what, "body.zstd")
        if coding != _RAW:
            raise WireError(f"{what}: field body_coding: {coding} is neither raw (0) nor zstd (1)")
        if len(body) > bound:
            raise WireError(f"{what}: field body: {len(body)} bytes exceed the {bound} possible")
        return body


def decompress_bounded(data: bytes | memoryview, bound: int, what: str, field: str) -> bytes:
    """One zstd frame declaring a content size of at most ``bound``, nothing after it.

    The declared size is checked before anything is allocated, so a hostile frame
    cannot make the receiver inflate gigabytes (a zip bomb)."""
    try:
        size = zstandard.frame_content_size(data)
        if not 0 <= size <= bound:
            raise WireError(
                f"{what}: field {field}: declared size {size} is unknown or exceeds {bound} bytes"
            )
        stream = zstandard.ZstdDecompressor().decompressobj()
        body = stream.decompress(data)  # libzstd refuses output beyond the declared size
    except zstandard.ZstdError as e:
        raise WireError(f"{what}: field {field}: {e}") from None
    if not stream.eof or len(body) != size:
        raise WireError(f"{what}: field {field}: incomplete frame ({len(body)} of {size} bytes)")
    if stream.unused_data:
        raise WireError(f"{what}: field {field}: {len(stream.unused_data)} bytes after the frame")
    return body


def _parse(argument: str | None) -> Zstd:
    opts = parse_options(argument, {"level"})
    return Zstd(int_option(opts, "level", DEFAULT_LEVEL, 1, MAX_LEVEL))


register_stage("zstd", _parse, role="bytes", usage="zstd[:level=N]")
