"""The codec stage registry, and the chain syntax it reads.

A stage is registered by name with its role and a factory that parses the entry's
argument (:func:`register_stage`). Built-in stages are the modules of
:mod:`fedbits.compress.stages`, found by listing the package; other packages add
stages through the ``fedbits.codecs`` entry-point group (as methods do through
``fedbits.methods``), so a new stage is one file and never an edit to the chain.

A chain is a list of ``name[:argument]`` entries: at most one positions stage, then
at most one values stage (fp32 when none), then any number of bytes stages, in that
order. It is parsed when the configuration is read, so a typo is a
:class:`~fedbits.errors.ConfigError` naming the config key and the entry, with every
registered stage listed, before any training starts, never a failure in round 7.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import cast, get_args

from fedbits.compress.codec import (
    ByteCodec,
    Codec,
    PositionCodec,
    Role,
    StageError,
    TransformCodec,
    ValueCodec,
)
from fedbits.errors import ConfigError

ENTRY_POINT_GROUP = "fedbits.codecs"
StageFactory = Callable[[str | None], Codec]
"""Builds a stage from the text after the colon (None when the entry has no colon);
raises :class:`StageError` (or ValueError) saying what is wrong with it."""

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_RANK: dict[Role, int] = {"positions": 0, "transform": 1, "values": 2, "bytes": 3}
_ROLE_LABELS: dict[Role, str] = {
    "positions": "sparsifier",
    "transform": "rotation",
    "values": "value format",
    "bytes": "byte stage",
}
_ROLE_RULES: dict[Role, str] = {
    "positions": "sparsifiers, at most one, first",
    "transform": "rotations, at most one, before the value format",
    "values": "value formats, at most one, fp32 when none",
    "bytes": "byte stages, last",
}


@dataclass(frozen=True)
class StageInfo:
    """A registered stage: how it is spelled and what builds it."""

    name: str
    role: Role
    usage: str  # the syntax, for messages: "int8[:block=N][,sr]"
    factory: StageFactory


@dataclass(frozen=True)
class Stages:
    """A parsed chain, by role."""

    positions: PositionCodec | None
    values: ValueCodec
    bytes: tuple[ByteCodec, ...]
    spec: tuple[str, ...]  # the normalised entries, as given (no default fp32 added)
    transform: TransformCodec | None = None  # last, so chains without one read as before


_STAGES: dict[str, StageInfo] = {}
_builtins_loaded = False
_plugins_loaded: set[tuple[str, str]] = set()


def register_stage(
    name: str, factory: StageFactory, *, role: Role, usage: str | None = None
) -> None:
    """Make ``name`` a chain entry: ``factory(argument)`` builds the stage.

    ``role``: which protocol of :mod:`fedbits.compress.codec` the stage implements.
    ``usage``: its syntax in the list of valid stages (default: the bare name).
    Registering the same factory twice is a no-op; another one under a taken name is
    an error, so two plugins cannot silently replace each other.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"codec stage name {name!r} must be lowercase letters, digits and _")
    if role not in get_args(Role):
        raise ValueError(f"codec stage {name!r}: role {role!r} is not one of {get_args(Role)}")
    info = StageInfo(name, role, usage or name, factory)
    if _STAGES.get(name, info) != info:
        raise ValueError(f"codec stage {name!r} is already registered")
    _STAGES[name] = info


def _load(rescan_plugins: bool = False) -> None:
    """Import the built-in stages once; load plugins not loaded yet (at first use, and
    again before reporting an unknown name, so a plugin installed after the first
    chain was parsed is still found)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from fedbits.compress import stages

        for mod in pkgutil.iter_modules(stages.__path__):
            importlib.import_module(f"{stages.__name__}.{mod.name}")
        rescan_plugins = True
    if not rescan_plugins:
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = (ep.name, ep.value)
        if key in _plugins_loaded:
            continue
        try:
            ep.load()
        except Exception as e:
            raise ConfigError(
                f"codec plugin {ep.name} = {ep.value!r} (entry point group {ENTRY_POINT_GROUP}) "
                f"failed to load: {e}"
            ) from e
        _plugins_loaded.add(key)


def available_stages() -> list[StageInfo]:
    """Every registered stage, plugins included: by role in chain order, then in the
    order they were registered."""
    _load(rescan_plugins=True)
    return sorted(_STAGES.values(), key=lambda info: _RANK[info.role])


def valid_stages() -> str:
    """The list a chain error ends with."""
    groups: dict[Role, list[str]] = {role: [] for role in _RANK}
    for info in available_stages():
        groups[info.role].append(info.usage)
    listed = "; ".join(
        f"{', '.join(usages)} ({_ROLE_RULES[role]})" for role, usages in groups.items() if usages
    )
    return f"Valid stages: {listed}"


def _lookup(name: str) -> StageInfo:
    _load()
    if name not in _STAGES:
        _load(rescan_plugins=True)
    if name not in _STAGES:
        raise StageError(f"unknown stage {name!r}")
    return _STAGES[name]


def _build(entry: str) -> tuple[StageInfo, Codec]:
    name, colon, rest = (part.strip() for part in entry.partition(":"))
    info = _lookup(name)
    return info, info.factory(rest if colon else None)


def parse_stages(entries: Sequence[str], field: str) -> Stages:
    """Validate and normalise a chain; ConfigError naming ``field`` and the entry."""
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise ConfigError(
            f"{field}: expected a list of stage strings, got {entries!r}. {valid_stages()}"
        )
    found: dict[Role, list[Codec]] = {role: [] for role in _RANK}
    last = -1
    for i, entry in enumerate(entries):
        where = f"{field}[{i}] {entry!r}"
        if not isinstance(entry, str):
            raise ConfigError(f"{where}: a stage must be a string. {valid_stages()}")
        try:
            info, stage = _build(entry)
        except ValueError as e:  # StageError, or a plugin's own parsing
            raise ConfigError(f"{where}: {e}. {valid_stages()}") from None
        rank = _RANK[info.role]
        repeated = bool(found[info.role]) and info.role != "bytes"
        if repeated or rank < last:
            problem = "a second" if repeated else "out of order:"
            raise ConfigError(
                f"{where}: {problem} {_ROLE_LABELS[info.role]}; a chain is at most one "
                f"sparsifier, then at most one rotation, then at most one value format, then "
                f"byte stages such as zstd. "
                f"{valid_stages()}"
            )
        found[info.role].append(stage)
        last = rank
    # The registered role says which protocol each stage implements.
    positions, values = found["positions"], found["values"] or [_build("fp32")[1]]
    return Stages(
        positions=cast(PositionCodec, positions[0]) if positions else None,
        transform=cast(TransformCodec, found["transform"][0]) if found["transform"] else None,
        values=cast(ValueCodec, values[0]),
        bytes=tuple(cast(ByteCodec, stage) for stage in found["bytes"]),
        spec=tuple(stage.spec for stages in found.values() for stage in stages),
    )
