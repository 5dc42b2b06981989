"""Update compression: codec chains that shrink what clients and server send.

A chain is a list of stage strings, e.g. ``["topk:1/16", "int8", "zstd"]``: at most
one sparsifier (which positions travel), one value format (how each value is
written) and any byte stages (zstd), in that order. Every payload is framed with a
version, a chain fingerprint and a CRC-32, so a corrupted payload, or one decoded
with another chain or for another vector length, is a
:class:`~fedbits.errors.WireError`, never a silently wrong tensor. See
``docs/compress.md`` for each stage's wire cost and error bound.

    chain = parse_chain(["topk:1/16", "int8", "zstd"], field="method.uplink")
    payload = chain.encode(x, segments=sizes, generator=gen)
    y = chain.decode(payload, numel=x.numel(), segments=sizes, what="client 3 uplink")

Stages are registered by name (:func:`register_stage`); a package adds its own
through the ``fedbits.codecs`` entry-point group, implementing one of the protocols
of :mod:`fedbits.compress.codec`.
"""

from fedbits.compress.chain import Chain, parse_chain
from fedbits.compress.codec import (
    Buffer,
    ByteCodec,
    Codec,
    PositionCodec,
    Role,
    StageError,
    TransformCodec,
    ValueCodec,
)
from fedbits.compress.feedback import ErrorFeedback
from fedbits.compress.options import density, flag_option, int_option, no_options, parse_options
from fedbits.compress.registry import (
    ENTRY_POINT_GROUP,
    StageInfo,
    available_stages,
    register_stage,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Buffer",
    "ByteCodec",
    "Chain",
    "Codec",
    "ErrorFeedback",
    "PositionCodec",
    "Role",
    "StageError",
    "StageInfo",
    "TransformCodec",
    "ValueCodec",
    "available_stages",
    "density",
    "flag_option",
    "int_option",
    "no_options",
    "parse_chain",
    "parse_options",
    "register_stage",
]
