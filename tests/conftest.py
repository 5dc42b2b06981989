"""Shared fixtures: tiny configs in temporary run directories, shared data location."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

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
