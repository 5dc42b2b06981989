"""Federated fine-tuning methods: one module per method in this package, found by name.

This package re-exports the interface (:mod:`.base`) and the registry (:mod:`.registry`)
for code that uses methods (the runtime, the command line, plugins). Method modules
import those two modules directly, never this package, so no import runs in a circle.

Every method module is imported to list the methods and to validate a config, so its
top level imports nothing heavier than torch: transformers, peft and datasets are
imported inside the functions that build or train a model, and the runtime not at all
(tests/test_method_options.py and tests/test_layering.py check).
"""

from __future__ import annotations

from fedbits.methods.base import (
    ClientData,
    ClientResult,
    ClientSide,
    ClientStore,
    ClientUpdate,
    MethodContext,
    MethodOptions,
    MethodSpec,
    ServerSide,
)
from fedbits.methods.registry import available_methods, describe_options, get_method, register

__all__ = [
    "ClientData",
    "ClientResult",
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
