"""Shared fixtures: tiny configs in temporary run directories, shared data location."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import settings
from safetensors.torch import load_file

# The test command runs the same property examples every time: a failure there is
# reproducible from the log, never a one-off. `HYPOTHESIS_PROFILE=explore` searches afresh.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "tests" / "plugins"
"""Packages from outside fedbits (a method, a codec stage), found through their
``*.dist-info/entry_points.txt`` as if installed: the suites run them like built-ins."""
sys.path.insert(0, str(PLUGINS))
TINY = REPO / "examples" / "tiny.toml"


@pytest.fixture(autouse=True)
def _fedbits_logging():
    """``fedbits.cli.main`` configures the "fedbits" logger for its process (handler and
    level): a test that calls it must not hand that on to the next test."""
    logger = logging.getLogger("fedbits")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine idle OpenMP
    workers spinning against other jobs make them ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_final_and_ledger(a: Path, b: Path) -> None:
    """Two runs ended with the same weights, bit for bit, after the same messages."""
    want = load_file(next((a / "final").glob("*.safetensors")))
    got = load_file(next((b / "final").glob("*.safetensors")))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (a / "ledger.jsonl").read_text() == (b / "ledger.jsonl").read_text()


def shared_data() -> Path:
    return Path(os.environ.get("FEDBITS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    """Overrides that put a tiny run's outputs under tmp_path."""
    return [f"run.out_dir={tmp_path / 'runs'}"]


def save_small_llama(path: Path, layers: int) -> str:
    """A random Llama of ``layers`` decoder layers (width 32) with the byte tokenizer,
    saved as a save_pretrained directory: block methods need more layers than tiny's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fedbits.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, max_position_embeddings=256, vocab_size=len(tok),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (bench/ is no package), registered before it runs,
    as its dataclasses need."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

