"""A codec chain: choose positions, write the values, transform the bytes, frame with
a checksum. The stages are whatever the registry built (:mod:`fedbits.compress.codec`
says what each role does); the chain owns everything they share.

Payload layout (all integers little-endian)::

    u8   format version (1)
    2    chain fingerprint: BLAKE2b-16 of what decides how the body is read
    body                                      after each bytes stage, in order
    u32  CRC-32 of (numel u64 [, each segment size u64 for a per-tensor sparsifier])
         + all bytes above

    body = positions + rotation + values
    positions: nothing (dense) | the positions stage's bytes (top-k indices, a random-k seed)
    rotation:  nothing | the rotation stage's header (a seed); the values stage then
               writes the rotated vector of ``size(k)`` values
    values:    the values stage's bytes for the k (or n) values
    zstd:      u8 coding (0 raw, 1 zstd) + the body, raw or compressed

Framing is 7 bytes (8 with zstd). The vector's length is not sent: both sides know
it, and it is folded into the checksum instead, so decoding with a different numel
(or, for per-tensor top-k, different segments) fails the check rather than
producing a plausible wrong tensor. The same check catches any bit flip, so a
payload that decodes is exactly the one that was encoded (but for a 2^-32 chance).
The fingerprint, checked first, covers each stage's name and the parameters that
decide how its bytes are read (the density, the block size; not the zstd level or
``sr``, which do not), so a payload decoded with another chain is refused with a
message saying so.

Beyond the checksum the chain checks, for every stage: the count of positions, the
exact size of the values, that decoded values are finite, and that no bytes stage
inflates past the largest body this chain could write for this vector.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from fedbits.compress.codec import Buffer, Codec
from fedbits.compress.registry import Stages, parse_stages
from fedbits.errors import WireError
from fedbits.wire import Reader

FORMAT_VERSION = 1
_CRC_BYTES = 4


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
        return self._stages.positions is not None

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
        positions, values = self._stages.positions, self._stages.values
        body: list[memoryview] = []
        sent = flat
        if positions is not None:
            idx, where = positions.select(flat.numpy(), segs, generator)
            _check_size("positions", positions, idx.size, positions.count(n, segs))
            body.append(_view(where))
            sent = torch.from_numpy(flat.numpy()[idx])
        transform = self._stages.transform
        if transform is not None:
            rotated, header = transform.forward(sent, generator)
            _check_size("values", transform, rotated.numel(), transform.size(sent.numel()))
            body.append(_view(header))
            _check_size("bytes", transform, body[-1].nbytes, transform.header_bytes)
            sent = rotated
        written = [_view(part) for part in values.encode(sent, generator)]
        _check_size("bytes", values, sum(part.nbytes for part in written),
                    values.nbytes(sent.numel()))
        body += written
        for stage in self._stages.bytes:
            body = [_view(part) for part in stage.encode(b"".join(body))]
        frame = [memoryview(self._head), *body]
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
        head = len(self._head)
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
            # What each bytes stage was given, at most: the largest honest body, then
            # whatever the stage before it could have made of that.
            bounds, bound = [], self._max_body(n, segs)
            for stage in self._stages.bytes:
                bounds.append(bound)
                bound = stage.max_bytes(bound)
            for stage, bound in zip(reversed(self._stages.bytes), reversed(bounds), strict=True):
                body = _view(stage.decode(body, bound, what))
            return self._read_body(body, n, segs, what)
        except (ValueError, IndexError, OverflowError, RuntimeError) as e:
            # The checks above are meant to leave nothing for these to catch; if a
            # crafted payload still reaches one, it is the sender's fault, not a crash.
            raise WireError(f"{what}: malformed payload: {e}") from None

    def _read_body(
        self, body: memoryview, n: int, segs: list[int] | None, what: str
    ) -> tuple[np.ndarray | None, torch.Tensor]:
        """Positions, then the values: everything after the positions, read in place."""
        positions, stage = self._stages.positions, self._stages.values
        idx = None
        count = n
        if positions is not None:
            r = Reader(body, what)
            idx = positions.read(r, n, segs, what)
            count = positions.count(n, segs)
            if idx.size != count:
                raise WireError(
                    f"{what}: field indices: {idx.size} positions, {positions.spec} sends {count}"
                )
            body = body[len(body) - r.remaining :]
        transform, header = self._stages.transform, None
        if transform is not None:
            if len(body) < transform.header_bytes:
                raise WireError(f"{what}: field rotation: {len(body)} bytes, {transform.spec} "
                                f"writes {transform.header_bytes}")
            header, body = body[: transform.header_bytes], body[transform.header_bytes :]
            count, kept = transform.size(count), count
        if len(body) != stage.nbytes(count):
            raise WireError(
                f"{what}: field values: {len(body)} bytes, but {count} values in {stage.spec} "
                f"take {stage.nbytes(count)}"
            )
        values = stage.decode(body, count, what)
        if values.dtype != torch.float32 or values.shape != (count,):
            raise TypeError(
                f"values stage {stage.spec} decoded {values.dtype} {tuple(values.shape)}, "
                f"expected float32 ({count},)"
            )
        if transform is not None and header is not None:
            values = transform.inverse(header, values, kept, what)
            if values.dtype != torch.float32 or values.shape != (kept,):
                raise TypeError(f"rotation stage {transform.spec} returned {values.dtype} "
                                f"{tuple(values.shape)}, expected float32 ({kept},)")
        if not np.isfinite(values.numpy()).all():
            raise WireError(f"{what}: field values: non-finite value")
        return idx, values

    # ------------------------------------------------------------ sizes and checks

    @property
    def _needs_segments(self) -> bool:
        positions = self._stages.positions
        return positions is not None and positions.uses_segments

    def _max_body(self, n: int, segs: list[int] | None) -> int:
        """The largest body an honest encoder writes: caps decompression."""
        positions, transform = self._stages.positions, self._stages.transform
        count = n if positions is None else positions.count(n, segs)
        values = (self._stages.values.nbytes(count) if transform is None
                  else transform.header_bytes + self._stages.values.nbytes(transform.size(count)))
        return values if positions is None else positions.max_bytes(n) + values

    def _check_segments(self, segments: Sequence[int] | None, n: int) -> list[int] | None:
        if segments is None:
            positions = self._stages.positions
            if positions is not None and positions.uses_segments:
                raise ValueError(
                    f"{positions.spec} needs segments= (the sizes of the tensors in the vector)"
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
    parts = [
        _wire_name(stages.positions) if stages.positions else "dense",
        # a rotation joins only where there is one: chains without keep their fingerprints
        *([_wire_name(stages.transform)] if stages.transform else []),
        _wire_name(stages.values),
        "+".join(map(_wire_name, stages.bytes)) or "raw",
    ]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=2).digest()


def _view(part: Buffer) -> memoryview:
    """A stage's output as the buffer it is (numpy's stubs declare ndarray a buffer only
    from Python 3.12 on)."""
    return memoryview(part)  # type: ignore[arg-type]


def _wire_name(stage: Codec) -> str:
    """A stage's part of the fingerprint: its name and what decides how it is read."""
    return f"{stage.name}:{stage.wire_params}" if stage.wire_params else stage.name


def _check_size(unit: str, stage: Codec, got: int, documented: int) -> None:
    """An encoder wrote what its stage says it writes, or the receiver could not read it:
    a bug in the stage, caught on the sending side."""
    if got != documented:
        raise RuntimeError(f"stage {stage.spec} wrote {got} {unit} where it documents {documented}")


def _check_vector(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype != torch.float32:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"a codec chain encodes a 1-D float32 tensor, got {got}")
    flat = x.detach().cpu().contiguous()
    if not np.isfinite(flat.numpy()).all():  # numpy: 15x faster than torch.isfinite here
        raise ValueError("cannot encode non-finite values (inf or nan)")
    return flat
