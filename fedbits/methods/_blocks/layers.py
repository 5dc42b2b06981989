"""Decoder layers, found from parameter names.

Every selection in this package is expressed in decoder-layer indices, so both
halves of a method must agree on which parameter belongs to which layer without
sending names. The index comes from the name alone: Llama-style models call
their layers ``model.layers.N.``, GPT-2 ``transformer.h.N.``, and peft keeps those
names under its ``base_model.model.`` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fedbits.errors import ConfigError

LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
"""``…layers.N.`` (Llama, Mistral, Qwen, SmolLM, OPT, NeoX) or ``…h.N.`` (GPT-2)."""


def layer_of(name: str) -> int | None:
    """The decoder layer a parameter belongs to, or None (embeddings, head, final norm)."""
    m = LAYER_NAME.search(name)
    return int(m.group(1)) if m else None


def decoder_layers(names: Iterable[str], model_name: str = "the model") -> list[list[str]]:
    """Parameter names per decoder layer, index 0 first, each in model order.

    Raises ConfigError when the names show no layers, or layer indices with gaps
    (a naming scheme this regex misreads is better refused than half-selected).
    """
    by_layer: dict[int, list[str]] = {}
    for name in names:
        index = layer_of(name)
        if index is not None:
            by_layer.setdefault(index, []).append(name)
    if not by_layer:
        raise ConfigError(
            f"{model_name} has no decoder layers recognisable from its parameter names "
            "(expected 'model.layers.N.' as in Llama or 'transformer.h.N.' as in GPT-2); "
            "select parameters with method.include patterns and layer_fraction = 0 instead"
        )
    if sorted(by_layer) != list(range(len(by_layer))):
        raise ConfigError(
            f"{model_name}: decoder layer indices {sorted(by_layer)} are not 0..{len(by_layer) - 1}"
        )
    return [by_layer[i] for i in range(len(by_layer))]
