"""What a codec stage is: the four roles a stage plays in a chain, as protocols.

A chain is at most one **positions** stage (which values travel: top-k, random-k),
then at most one **transform** stage (a rotation of the travelling values: hadamard),
then one **values** stage (how each travelling value is written: fp16, int8, ...),
then any number of **bytes** stages (transforms of the whole body: zstd). Each role
is a protocol below, so a stage is any object with the right methods: a built-in
in ``fedbits/compress/stages/``, or a plugin's, registered by name with
:func:`fedbits.compress.register_stage` (``docs/compress.md``, "Writing a codec
stage").

A stage object is immutable and built from its chain entry by the factory it was
registered with. The chain around it owns the framing, the checksum, the
fingerprint and the checks every stage would otherwise repeat: a decoder sees only
payloads whose checksum matched, and a values stage's ``decode`` only ``data`` of
exactly ``nbytes(count)`` bytes. What is left to a decoder is to refuse any other
bytes no encoder writes, with a :class:`~fedbits.errors.WireError` naming ``what``
and the field, and never to allocate more than the receiver's ``n`` or ``count``
allow: a payload may be hostile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import torch

from fedbits.wire import Reader

Role = Literal["positions", "transform", "values", "bytes"]
Buffer = bytes | bytearray | memoryview | np.ndarray
"""What an encoder may return: anything ``bytes.join`` and ``zlib.crc32`` read in
place (a C-contiguous little-endian numpy array included), so no stage copies its
output only to hand it over."""


class StageError(ValueError):
    """A chain entry's argument is invalid; the chain parser adds the config key and
    the entry, so the message says only what is wrong (``block=0 must lie in ...``)."""


class Codec(Protocol):
    """What every stage has, whatever its role."""

    @property
    def name(self) -> str:
        """The registered name: the part of a chain entry before the colon."""
        ...

    @property
    def spec(self) -> str:
        """The normalised entry, defaults written out (``int8:block=64``), so two
        spellings of one stage compare equal."""
        ...

    @property
    def wire_params(self) -> str:
        """The parameters that decide how bytes are read (``block=64``; ``""`` for
        none). With the name they form the stage's part of the chain fingerprint, so a
        receiver refuses a payload another chain wrote; options that only change the
        encoder's choices (a zstd level, stochastic rounding) stay out, and the two
        sides may differ there."""
        ...


class PositionCodec(Codec, Protocol):
    """Chooses which positions of the vector travel, and says which on the wire."""

    @property
    def uses_segments(self) -> bool:
        """True when positions are chosen per tensor: encode and decode then need
        ``segments=`` (the tensor sizes), and the checksum covers them."""
        ...

    def count(self, n: int, segments: Sequence[int] | None) -> int:
        """How many positions travel for a vector of ``n`` values."""
        ...

    def max_bytes(self, n: int) -> int:
        """The most bytes :meth:`select` writes for ``n`` values (bounds decompression)."""
        ...

    def select(
        self, x: np.ndarray, segments: Sequence[int] | None, generator: torch.Generator | None
    ) -> tuple[np.ndarray, Buffer]:
        """(sorted distinct int64 positions, exactly ``count`` of them; the bytes that
        tell the receiver which) for the float32 vector ``x``."""
        ...

    def read(self, r: Reader, n: int, segments: Sequence[int] | None, what: str) -> np.ndarray:
        """The positions :meth:`select` wrote, read from ``r`` (the values follow them):
        sorted, distinct and below ``n``; the chain checks their count."""
        ...


class TransformCodec(Codec, Protocol):
    """Maps the travelling values to another vector before the values stage writes it
    (a random rotation that spreads outliers, so a quantiser's range shrinks), and back
    after it reads them. Its own bytes (a seed) travel before the values."""

    @property
    def header_bytes(self) -> int:
        """The exact size of the bytes :meth:`forward` returns beside the vector."""
        ...

    def size(self, count: int) -> int:
        """The length of the transformed vector for ``count`` values (padding included)."""
        ...

    def forward(
        self, values: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, Buffer]:
        """(the float32 vector of ``size(count)`` values the values stage writes, the
        ``header_bytes`` bytes the receiver needs to invert it); ValueError for values
        the transform cannot hold."""
        ...

    def inverse(self, header: memoryview, values: torch.Tensor, count: int,
                what: str) -> torch.Tensor:
        """The ``count`` float32 values :meth:`forward` was given (up to rounding and
        the values stage's error), from its header and the decoded vector; the chain
        refuses non-finite results."""
        ...


class ValueCodec(Codec, Protocol):
    """Writes the values that travel, and reads them back."""

    def nbytes(self, count: int) -> int:
        """The exact size of ``count`` values: the chain refuses any other length
        before :meth:`decode` runs."""
        ...

    def encode(self, values: torch.Tensor, generator: torch.Generator | None) -> list[Buffer]:
        """The wire bytes of finite 1-D float32 ``values``; ValueError for values the
        format cannot hold (nothing sends inf). ``generator``: for stochastic choices,
        the same state gives the same bytes."""
        ...

    def decode(self, data: memoryview, count: int, what: str) -> torch.Tensor:
        """``count`` float32 values from exactly ``nbytes(count)`` bytes; the chain
        refuses non-finite results."""
        ...


class ByteCodec(Codec, Protocol):
    """Transforms the whole body (positions and values), e.g. entropy coding."""

    def max_bytes(self, size: int) -> int:
        """The most bytes :meth:`encode` writes for ``size`` input bytes."""
        ...

    def encode(self, data: bytes) -> list[Buffer]:
        """The transformed body."""
        ...

    def decode(self, data: memoryview, bound: int, what: str) -> Buffer:
        """The body :meth:`encode` was given, refusing (before inflating anything)
        one longer than ``bound``: the most an honest sender's chain could have
        produced for this vector."""
        ...
