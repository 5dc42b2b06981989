"""The method registry: one module per method in this package, found by name.

Each module calls :func:`register` at import. Built-in modules are discovered by
listing this package, and third-party packages can add methods through the
``fedbits.methods`` entry-point group, so adding a method never edits the runtime
(as peft's ``tuners/``).
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

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
    "get_method",
    "register",
]
