"""The method registry: one module per method in this package, found by name.

Each module calls :func:`register` at import. Built-in modules are discovered by
listing this package, and third-party packages can add methods through the
``fedbits.methods`` entry-point group, so adding a method never edits the runtime
(as peft's ``tuners/``).

Every method module is imported to list the methods and to validate a config, so its
top level imports nothing heavier than torch: transformers, peft, datasets and the
runtime are imported inside the functions that build or train a model
(tests/test_method_options.py checks).
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedbits.errors import ConfigError
from fedbits.methods.base import (
    ClientData,
    ClientSide,
    ClientStore,
    ClientUpdate,
    MethodContext,
    MethodOptions,
    MethodSpec,
    ServerSide,
)

_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
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
        lines.append(f"{key} = {default!r}{f' ({takes})' if takes else ''}  {field.description or ''}")
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
        f"{sign} {getattr(m, attr)}"
        for m in field.metadata for attr, sign in _BOUNDS.items() if getattr(m, attr, None) is not None
    )


__all__ = [
    "ClientData",
    "ClientSide",
    "ClientStore",
    "ClientUpdate",
    "MethodContext",
    "MethodOptions",
    "MethodSpec",
    "ServerSide",
    "available_methods",
    "describe_options",
    "get_method",
    "register",
]
