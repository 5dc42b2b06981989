"""Ro et al. 2022's setting: a Transformer trained from scratch (a random architecture
resized by the model.* size keys), central pre-training as one client holding all the
data, then federated fine-tuning from the saved final directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedbits.models import random_shape
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment

from conftest import REPO

PAPERS = REPO / "examples" / "papers"
# the examples scaled down to seconds; everything else is the example's own
SMALL_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
               "model.num_kv_heads=4", "model.intermediate_size=128"]
SMALL_RUN = ["data.builtin_per_task=10", "clients.max_length=64", "clients.batch_size=4",
             "eval.every=1", "eval.max_examples=16"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["ro2022", "ro2022-central"])
def test_the_examples_build_a_21m_transformer_from_scratch(name):
    shape = random_shape(load_config(PAPERS / f"{name}.toml").model)
    assert 20e6 < shape.parameters < 22e6, shape.parameters
    assert shape.vocab_size == 259  # the byte tokenizer's ids: no row left untrained


def test_central_pretraining_then_federated_fine_tuning(tmp_path, monkeypatch):
    """Step 1 trains from scratch with one client and saves final/ (weights and
    tokenizer); step 2 names that directory as its model and trains on from it."""
    monkeypatch.chdir(tmp_path)  # the examples' paths are relative to where fedbits runs
    central = run_experiment(load_config(PAPERS / "ro2022-central.toml", SMALL_MODEL + SMALL_RUN + [
        "run.rounds=2", "clients.local_steps=8"]))
    assert central == Path("runs/ro2022-central")
    rows = _rows(central)
    assert rows[0]["eval_loss"] > 0.9 * math.log(259)  # random weights: near uniform
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.3  # from scratch, it learns
    final = central / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in
                                                                    final.iterdir()}
    federated = run_experiment(load_config(PAPERS / "ro2022-federated.toml", SMALL_RUN + [
        "run.rounds=2", "clients.local_steps=2", "clients.per_round=3", "data.num_clients=6"]))
    tuned = _rows(federated)
    # it starts where step 1 ended, far below the random model's loss, and moves on
    assert tuned[0]["eval_loss"] < rows[0]["eval_loss"] - 0.3
    assert tuned[-1]["eval_loss"] < tuned[0]["eval_loss"]
    assert not any(r["rejected"] for r in tuned)
    before, after = load_file(final / "model.safetensors"), load_file(
        federated / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not before[k].equal(after[k]) for k in before)
