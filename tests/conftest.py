"""Shared fixtures: tiny configs in temporary run directories, shared data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# The test command runs the same property examples every time: a failure there is
# reproducible from the log, never a one-off. `HYPOTHESIS_PROFILE=explore` searches afresh.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.toml"


def quiet(_msg: str) -> None:
    """A run's ``log`` when a test does not read it."""


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine idle OpenMP
    workers spinning against other jobs make them ten times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_data() -> Path:
    return Path(os.environ.get("FEDBITS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    """Overrides that put a tiny run's outputs under tmp_path."""
    return [f"run.out_dir={tmp_path / 'runs'}"]
