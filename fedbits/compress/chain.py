"""A codec chain: sparsify, write the values, entropy-code, frame with a checksum.

Payload layout (all integers little-endian)::

    u8   format version (1)
    2    chain fingerprint: BLAKE2b-16 of what decides how the body is read
    [u8  body coding: 0 raw, 1 zstd]          only for chains ending in zstd
    body                                      possibly one zstd frame
    u32  CRC-32 of (numel u64 [, each segment size u64 for topk_tensor]) + all bytes above

    body = positions + values
    positions: nothing (dense) | encode_indices (top-k) | u64 seed (random-k)
    values:    the format's bytes for the k (or n) values, see values.py

Framing is 7 bytes (8 with zstd). The vector's length is not sent: both sides know
it, and it is folded into the checksum instead, so decoding with a different numel
(or, for per-tensor top-k, different segments) fails the check rather than
producing a plausible wrong tensor. The same check catches any bit flip, so a
payload that decodes is exactly the one that was encoded (but for a 2^-32 chance).
The fingerprint, checked first, covers
the sparsifier and density, the value format and block size, and whether zstd is on
(not the zstd level or ``sr``, which do not change how bytes are read), so a payload
decoded with another chain is refused with a message saying so.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import zstandard

from fedbits.compress.indices import decode_indices, encode_indices
from fedbits.compress.sparsify import (
    random_positions,
    segment_topk_positions,
    topk_positions,
)
from fedbits.compress.stages import Sparsifier, Stages, ValueFormat, Zstd, parse_stages
from fedbits.compress.values import decode_values, encode_values, value_bytes
from fedbits.errors import WireError
from fedbits.wire import Reader
from fedbits.wire.codec import zstd_decompress_bounded

FORMAT_VERSION = 1
_RAW, _ZSTD = 0, 1
_CRC_BYTES = 4
_SEED_BYTES = 8
_MAX_SEED = 2**63 - 1  # torch.randint's exclusive bound for an int64 draw


def parse_chain(stages: Sequence[str], field: str = "chain") -> Chain:
    """The chain a config list spells; ConfigError naming ``field`` and the bad entry."""
    return Chain(parse_stages(stages, field))


class Chain:
    """An immutable codec chain; build it with :func:`parse_chain`."""

    def __init__(self, stages: Stages) -> None:
        self._stages = stages
        self._head = bytes([FORMAT_VERSION]) + _fingerprint(stages)

    @property
    def spec(self) -> tuple[str, ...]:
        """The normalised stage strings (defaults written out)."""
        return self._stages.spec

    @property
    def is_sparse(self) -> bool:
        """True when only some positions travel (the rest decode to zero)."""
        return self._stages.sparsifier is not None

    @property
    def _sparsifier(self) -> Sparsifier | None:
        return self._stages.sparsifier

    @property
    def _values(self) -> ValueFormat:
        return self._stages.values

    @property
    def _zstd(self) -> Zstd | None:
        return self._stages.zstd

    def __repr__(self) -> str:
        return f"Chain({list(self.spec)!r})"

    # ------------------------------------------------------------ encode

    def encode(
        self,
        x: torch.Tensor,
        segments: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> bytes:
        """The payload for a 1-D float32 vector.

        ``segments``: sizes of the tensors concatenated in ``x`` (needed by
        ``topk_tensor``, checked against ``x`` whenever given). ``generator``: needed
        by ``randk`` and ``sr``; the same generator state gives the same bytes.
        ValueError on non-finite input or values a float format cannot hold.
        """
        flat = _check_vector(x)
        n = flat.numel()
        segs = self._check_segments(segments, n)
        positions: list[bytes] = []  # what says which positions travel
        sent = flat
        sparsifier = self._sparsifier
        if sparsifier is not None:
            if sparsifier.kind == "randk":
                if generator is None:
                    raise ValueError(f"{sparsifier} needs a torch.Generator to draw its seed")
                seed = int(torch.randint(0, _MAX_SEED, (1,), generator=generator))
                idx = random_positions(seed, n, sparsifier.count(n))
                positions.append(struct.pack("<Q", seed))
            else:
                if sparsifier.kind == "topk":
                    idx = topk_positions(flat.numpy(), sparsifier.count(n))
                else:
                    idx = segment_topk_positions(flat.numpy(), segs or [], sparsifier)
                positions.append(encode_indices(idx, n))
            sent = torch.from_numpy(flat.numpy()[idx])
        body = [*positions, *encode_values(self._values, sent, generator)]
        frame: list[bytes | np.ndarray] = [self._head]
        if self._zstd is None:
            frame += body
        else:
            raw = b"".join(body)
            packed = zstandard.ZstdCompressor(level=self._zstd.level).compress(raw)
            frame += [bytes([_ZSTD]), packed] if len(packed) < len(raw) else [bytes([_RAW]), raw]
        crc = zlib.crc32(self._context(n, segs))
        for part in frame:
            crc = zlib.crc32(part, crc)
        return b"".join([*frame, struct.pack("<I", crc)])

    # ------------------------------------------------------------ decode

    def decode(
        self,
        payload: bytes,
        numel: int,
        segments: Sequence[int] | None = None,
        what: str = "payload",
    ) -> torch.Tensor:
        """The float32 vector of length ``numel``, zeros where nothing was sent.

        Anything malformed, corrupted, or encoded by another chain or for another
        numel is a :class:`~fedbits.errors.WireError` naming ``what``.
        """
        idx, values = self._decode(payload, numel, segments, what)
        if idx is None:
            return values
        out = np.zeros(numel, dtype=np.float32)  # numpy: lazily zeroed, 4x torch.zeros here
        out[idx] = values.numpy()
        return torch.from_numpy(out)

    def decode_sparse(
        self,
        payload: bytes,
        numel: int,
        segments: Sequence[int] | None = None,
        what: str = "payload",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted int64 positions, float32 values) that were sent; every position
        for a dense chain."""
        idx, values = self._decode(payload, numel, segments, what)
        positions = torch.arange(numel) if idx is None else torch.from_numpy(idx)
        return positions, values

    def _decode(
        self, payload: bytes, numel: int, segments: Sequence[int] | None, what: str
    ) -> tuple[np.ndarray | None, torch.Tensor]:
        if isinstance(numel, bool) or not isinstance(numel, (int, np.integer)) or numel < 0:
            raise ValueError(f"numel must be an integer >= 0, got {numel!r}")
        n = int(numel)
        segs = self._check_segments(segments, n)
        data = memoryview(payload)
        head = len(self._head) + (self._zstd is not None)
        if len(data) < head + _CRC_BYTES:
            raise WireError(
                f"{what}: {len(data)} bytes is shorter than the {head + _CRC_BYTES}-byte frame"
            )
        if data[1:3] != self._head[1:3]:
            raise WireError(
                f"{what}: encoded with a different codec chain than {list(self.spec)} (fingerprint "
                f"{bytes(data[1:3]).hex()}, expected {self._head[1:3].hex()}), or corrupt"
            )
        crc = zlib.crc32(data[:-_CRC_BYTES], zlib.crc32(self._context(n, segs)))
        if crc != int.from_bytes(data[-_CRC_BYTES:], "little"):
            extra = " and these segments" if self._needs_segments else ""
            raise WireError(
                f"{what}: checksum mismatch: the payload is corrupt, or was encoded for "
                f"another vector than this numel={n}{extra}"
            )
        if data[0] != FORMAT_VERSION:
            raise WireError(f"{what}: format version {data[0]}, this build reads {FORMAT_VERSION}")
        body = data[head:-_CRC_BYTES]
        try:
            if self._zstd is not None:
                coding = data[head - 1]
                if coding == _ZSTD:
                    bound = self._max_body(n, segs)
                    body = memoryview(zstd_decompress_bounded(body, bound, what, "body.zstd"))
                elif coding != _RAW:
                    raise WireError(
                        f"{what}: field body_coding: {coding} is neither raw (0) nor zstd (1)"
                    )
            return self._read_body(body, n, segs, what)
        except (ValueError, IndexError, OverflowError, RuntimeError) as e:
            # The checks above are meant to leave nothing for these to catch; if a
            # crafted payload still reaches one, it is the sender's fault, not a crash.
            raise WireError(f"{what}: malformed payload: {e}") from None

    def _read_body(
        self, body: memoryview, n: int, segs: list[int] | None, what: str
    ) -> tuple[np.ndarray | None, torch.Tensor]:
        """Positions, then the values: everything after the positions, read in place."""
        sparsifier = self._sparsifier
        if sparsifier is None:
            return None, decode_values(self._values, body, n, what)
        r = Reader(body, what)
        expected = self._count(n, segs)
        if sparsifier.kind == "randk":
            idx = random_positions(r.u64("seed"), n, expected)
        else:
            idx = decode_indices(r, n, what)
            if idx.size != expected:
                raise WireError(
                    f"{what}: field indices: {idx.size} positions, {sparsifier} sends {expected}"
                )
            if sparsifier.kind == "topk_tensor":
                self._check_per_segment(idx, segs or [], what)
        values = body[len(body) - r.remaining :]
        return idx, decode_values(self._values, values, idx.size, what)

    def _check_per_segment(self, idx: np.ndarray, segs: list[int], what: str) -> None:
        bounds = np.searchsorted(idx, np.cumsum([0, *segs]))
        wanted = [self._sparsifier.count(size) for size in segs]  # type: ignore[union-attr]
        if np.diff(bounds).tolist() != wanted:
            raise WireError(
                f"{what}: field indices: positions are not {self._sparsifier} per tensor"
            )

    # ------------------------------------------------------------ sizes and checks

    @property
    def _needs_segments(self) -> bool:
        return self._sparsifier is not None and self._sparsifier.kind == "topk_tensor"

    def _count(self, n: int, segs: list[int] | None) -> int:
        """How many values travel for a vector of n."""
        sparsifier = self._sparsifier
        if sparsifier is None:
            return n
        if sparsifier.kind == "topk_tensor":
            return sum(sparsifier.count(size) for size in segs or [])
        return sparsifier.count(n)

    def _max_body(self, n: int, segs: list[int] | None) -> int:
        """The largest body an honest encoder writes: caps decompression."""
        positions = 0
        if self._sparsifier is not None:
            # The encoder keeps the smallest index coding, never above the bitmask.
            positions = _SEED_BYTES if self._sparsifier.kind == "randk" else 1 + -(-n // 8)
        return positions + value_bytes(self._values, self._count(n, segs))

    def _check_segments(self, segments: Sequence[int] | None, n: int) -> list[int] | None:
        if segments is None:
            if self._needs_segments:
                raise ValueError(
                    f"{self._sparsifier} needs segments= (the sizes of the tensors in the vector)"
                )
            return None
        segs = [int(s) for s in segments]
        if any(s < 0 for s in segs) or sum(segs) != n:
            raise ValueError(
                f"segments must be sizes >= 0 summing to {n}, got a sum of {sum(segs)}"
            )
        return segs

    def _context(self, n: int, segs: list[int] | None) -> bytes:
        """What the checksum covers beyond the payload: the receiver's view of the vector."""
        context = struct.pack("<Q", n)
        if self._needs_segments:
            context += np.asarray(segs, dtype="<u8").tobytes()
        return context


def _fingerprint(stages: Stages) -> bytes:
    values = stages.values
    parts = [
        str(stages.sparsifier) if stages.sparsifier else "dense",
        f"{values.name}:block={values.block}" if values.is_int else values.name,
        "zstd" if stages.zstd else "raw",
    ]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=2).digest()


def _check_vector(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype != torch.float32:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"a codec chain encodes a 1-D float32 tensor, got {got}")
    flat = x.detach().cpu().contiguous()
    if not np.isfinite(flat.numpy()).all():  # numpy: 15x faster than torch.isfinite here
        raise ValueError("cannot encode non-finite values (inf or nan)")
    return flat


