"""The method registry: every method registered by name, found when first asked for.

Method modules call :func:`register` at import. Built-in ones are discovered by listing
this package, and third-party packages can add methods through the ``fedbits.methods``
entry-point group, so adding a method never edits the runtime (as peft's ``tuners/``).

A module of its own, importing only :mod:`fedbits.methods.base`, so that a method
module registers itself without importing the package that lists it: the package
imports the method modules (by computed name), never the other way round.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedbits.errors import ConfigError
from fedbits.methods.base import MethodSpec

_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False
NOT_METHODS = frozenset({"base", "registry"})
"""Modules of this package that hold no method (private ``_`` modules hold none either)."""


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def builtin_method_modules() -> list[str]:
    """The fully qualified names of the built-in method modules (and packages)."""
    here = [str(Path(__file__).parent)]
    return [f"{__package__}.{mod.name}" for mod in pkgutil.iter_modules(here)
            if not mod.name.startswith("_") and mod.name not in NOT_METHODS]


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in builtin_method_modules():
        importlib.import_module(name)
    for ep in entry_points(group="fedbits.methods"):
        ep.load()


def available_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r} (available: {', '.join(available_methods())})"
        ) from None


def describe_options(options: type[BaseModel]) -> list[str]:
    """One line per option for ``fedbits methods -v``: the key, its default (a
    ``default_factory``'s value, which pydantic's ``default`` hides), what values it
    takes, and its description."""
    lines = []
    for key, field in options.model_fields.items():
        default = field.get_default(call_default_factory=True)
        takes = _choices(field.annotation) or _bounds(field)
        takes = f" ({takes})" if takes else ""
        lines.append(f"{key} = {default!r}{takes}  {field.description or ''}")
    return lines


def _choices(annotation: Any) -> str:
    """``a | b | c`` for a Literal (or an optional one); empty for any other type."""
    if get_origin(annotation) is Literal:
        return " | ".join(map(str, get_args(annotation)))
    if get_origin(annotation) in (Union, UnionType):
        return " | ".join(c for arg in get_args(annotation) if (c := _choices(arg)))
    return ""


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds(field: FieldInfo) -> str:
    """A number's limits, e.g. ``>= 0, < 1`` (pydantic keeps each as a metadata object
    with one of these attributes)."""
    return ", ".join(
        f"{sign} {getattr(m, attr)}" for m in field.metadata
        for attr, sign in _BOUNDS.items() if getattr(m, attr, None) is not None
    )
