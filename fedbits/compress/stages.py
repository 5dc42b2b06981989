"""The chain syntax: a list of ``name[:options]`` strings, parsed and normalised once.

A chain is at most one sparsifier, then at most one value format, then optionally
``zstd``, in that order. Parsing happens when the configuration is read, so a typo
is a :class:`~fedbits.errors.ConfigError` naming the config key and the entry before
any training starts, never a failure in round 7.

Each stage is normalised to one spelling (defaults written out, densities as the
shortest float repr), so ``["topk:1/16", "int8"]`` and ``["topk:0.0625",
"int8:block=64"]`` are the same chain with the same :attr:`Chain.spec`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from fedbits.errors import ConfigError

SparsifierKind = Literal["topk", "topk_tensor", "randk"]
ValueName = Literal["fp32", "fp16", "bf16", "int8", "int4"]

VALID_STAGES = (
    "topk:<density>, topk_tensor:<density>, randk:<density>, fp32, fp16, bf16, "
    "int8[:block=N][,sr], int4[:block=N][,sr], zstd[:level=N] "
    "(density: a number in (0, 1] or a fraction such as 1/16; order: one sparsifier, "
    "then one value format, then zstd)"
)
DEFAULT_BLOCK = 64
MAX_BLOCK = 1 << 20
DEFAULT_ZSTD_LEVEL = 3
MAX_ZSTD_LEVEL = 22
_SPARSIFIERS = ("topk", "topk_tensor", "randk")
_FLOATS = ("fp32", "fp16", "bf16")
_INTS = ("int8", "int4")


@dataclass(frozen=True)
class Sparsifier:
    """Which positions travel: top-k by |x| (global or per tensor) or random-k."""

    kind: SparsifierKind
    density: Fraction  # exactly the value the normalised spec string spells

    def count(self, n: int) -> int:
        """k for n values: ceil(density·n), at least 1 unless n is 0."""
        return min(n, max(1, math.ceil(self.density * n)))

    def __str__(self) -> str:
        return f"{self.kind}:{float(self.density)!r}"


@dataclass(frozen=True)
class ValueFormat:
    """How the values that travel are written; ``block``/``stochastic`` are int-only."""

    name: ValueName = "fp32"
    block: int = DEFAULT_BLOCK
    stochastic: bool = False

    @property
    def is_int(self) -> bool:
        return self.name in _INTS

    def __str__(self) -> str:
        if not self.is_int:
            return self.name
        return f"{self.name}:block={self.block}" + (",sr" if self.stochastic else "")


@dataclass(frozen=True)
class Zstd:
    """Entropy-code the body; the level only changes speed and size, not the format."""

    level: int = DEFAULT_ZSTD_LEVEL

    def __str__(self) -> str:
        return f"zstd:level={self.level}"


@dataclass(frozen=True)
class Stages:
    sparsifier: Sparsifier | None
    values: ValueFormat
    zstd: Zstd | None
    spec: tuple[str, ...]


class _BadStage(Exception):
    """Why one entry is invalid; :func:`parse_stages` adds the key and entry."""


def _density(text: str) -> Fraction:
    try:
        # Normalise through the shortest float repr: the exact value the spec string shows.
        value = Fraction(repr(float(Fraction(text.strip()))))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise _BadStage(f"density {text!r} is not a number or fraction in (0, 1]") from None
    if not 0 < value <= 1:
        raise _BadStage(f"density {text!r} must lie in (0, 1]")
    return value


def _options(text: str | None, allowed: set[str]) -> dict[str, str]:
    """``key=value`` and bare flags, comma-separated; a flag maps to ""."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in allowed:
            raise _BadStage(f"unknown option {key!r} (allowed: {', '.join(sorted(allowed))})")
        if key in out:
            raise _BadStage(f"option {key!r} given twice")
        out[key] = value
    return out


def _int_option(opts: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    if key not in opts:
        return default
    try:
        value = int(opts[key])
    except ValueError:
        raise _BadStage(f"{key}={opts[key]!r} is not an integer") from None
    if not low <= value <= high:
        raise _BadStage(f"{key}={value} must lie in [{low}, {high}]")
    return value


def _stage(entry: str) -> Sparsifier | ValueFormat | Zstd:
    name, colon, rest = (part.strip() for part in entry.partition(":"))
    args = rest if colon else None
    if name in _SPARSIFIERS:
        if not args:
            raise _BadStage(f"{name} needs a density, e.g. {name}:1/16")
        return Sparsifier(name, _density(args))  # type: ignore[arg-type]
    if name in _FLOATS:
        if args is not None:
            raise _BadStage(f"{name} takes no options")
        return ValueFormat(name)  # type: ignore[arg-type]
    if name in _INTS:
        opts = _options(args, {"block", "sr"}) if args is not None else {}
        if opts.get("sr"):
            raise _BadStage("sr is a flag and takes no value")
        block = _int_option(opts, "block", DEFAULT_BLOCK, 1, MAX_BLOCK)
        return ValueFormat(name, block, "sr" in opts)  # type: ignore[arg-type]
    if name == "zstd":
        opts = _options(args, {"level"}) if args is not None else {}
        return Zstd(_int_option(opts, "level", DEFAULT_ZSTD_LEVEL, 1, MAX_ZSTD_LEVEL))
    raise _BadStage(f"unknown stage {name!r}")


_RANK = {Sparsifier: 0, ValueFormat: 1, Zstd: 2}
_ROLE = {Sparsifier: "sparsifier", ValueFormat: "value format", Zstd: "zstd"}


def parse_stages(entries: Sequence[str], field: str) -> Stages:
    """Validate and normalise a chain; ConfigError naming ``field`` and the entry."""
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise ConfigError(
            f"{field}: expected a list of stage strings, got {entries!r}. "
            f"Valid stages: {VALID_STAGES}"
        )
    found: dict[type, Sparsifier | ValueFormat | Zstd] = {}
    last_rank = -1
    for i, entry in enumerate(entries):
        where = f"{field}[{i}] {entry!r}"
        if not isinstance(entry, str):
            raise ConfigError(f"{where}: a stage must be a string. Valid stages: {VALID_STAGES}")
        try:
            stage = _stage(entry)
        except _BadStage as e:
            raise ConfigError(f"{where}: {e}. Valid stages: {VALID_STAGES}") from None
        kind = type(stage)
        if _RANK[kind] <= last_rank:
            problem = "a second" if kind in found else "out of order:"
            raise ConfigError(
                f"{where}: {problem} {_ROLE[kind]}; a chain is at most one sparsifier, then at "
                f"most one value format, then zstd. Valid stages: {VALID_STAGES}"
            )
        found[kind] = stage
        last_rank = _RANK[kind]
    return Stages(
        sparsifier=found.get(Sparsifier),  # type: ignore[arg-type]
        values=found.get(ValueFormat, ValueFormat()),  # type: ignore[arg-type]
        zstd=found.get(Zstd),  # type: ignore[arg-type]
        spec=tuple(str(stage) for stage in found.values()),
    )
