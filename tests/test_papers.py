"""The papers' settings: every ``examples/papers/*.toml`` validates and is documented in
docs/papers.md, and the pieces of ``bench/fidelity.py`` that make its table honest (the
bootstrap interval, the trial chosen on validation, the whole command on T0 when the
shared data is here)."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

from fedbits.resolve import load_config

from conftest import REPO, load_bench

PAPERS = sorted((REPO / "examples" / "papers").glob("*.toml"))
T0 = REPO.parent / "shared" / "data" / "t0"



fidelity = load_bench("fidelity")


def test_there_is_a_paper_example_per_seed_paper():
    names = {p.stem for p in PAPERS}
    assert {"fedkseed", "flasc", "cgfedllm", "fedcybgd", "ro2022", "fedzo"} <= names


@pytest.mark.parametrize("path", PAPERS, ids=[p.stem for p in PAPERS])
def test_paper_examples_validate_and_are_documented(path: Path):
    # the federated half of Ro et al.'s recipe starts from the central run's saved model,
    # which does not exist before that run: its structure is checked on a built-in model
    overrides = ["model.name=tiny-llama"] if path.stem == "ro2022-federated" else []
    cfg = load_config(path, overrides)
    assert cfg.run.rounds >= 1
    assert f"examples/papers/{path.name}" in (REPO / "docs" / "papers.md").read_text()


def test_bootstrap_interval_holds_the_mean_and_narrows_with_examples():
    rng = random.Random(0)
    few = [rng.gauss(10, 3) for _ in range(20)]
    many = [rng.gauss(10, 3) for _ in range(2000)]
    point, low, high = fidelity.bootstrap(few)
    assert point == pytest.approx(sum(few) / len(few))
    assert low < point < high
    _, low_many, high_many = fidelity.bootstrap(many)
    assert high_many - low_many < (high - low) / 3
    assert low_many < 10 < high_many


def test_bootstrap_weights_tokens():
    # per-example mean losses weighted by their token counts: the corpus-level loss
    point, low, high = fidelity.bootstrap([1.0, 3.0], [3, 1])
    assert point == pytest.approx(1.5)
    assert 1.0 <= low <= point <= high <= 3.0


def test_every_method_gets_the_same_number_of_trials():
    counts = {name: len(fidelity.trials(entry)) for name, entry in fidelity.METHODS.items()}
    assert len(set(counts.values())) == 1, counts
    # and each trial is a different setting
    for entry in fidelity.METHODS.values():
        sweep = fidelity.trials(entry)
        assert len({json.dumps(t, sort_keys=True) for t in sweep}) == len(sweep)


def test_every_paper_mode_in_the_sweep_is_a_valid_config(tmp_path):
    setting = fidelity.REDUCED
    base = fidelity.base_config(setting, "tiny-llama", 0) if T0.is_dir() else {
        "run": {"seed": 0, "rounds": 1}, "model": {"name": "tiny-llama"},
        "data": {"source": "builtin:tasks"}, "clients": {"per_round": 2},
        "eval": {"metrics": ["loss"]}}
    for name, entry in fidelity.METHODS.items():
        for i, (lr, server) in enumerate(fidelity.trials(entry)):
            cfg = fidelity.trial_config(base, setting, name, entry, lr, server,
                                        str(tmp_path), f"{name}-{i}")
            assert cfg.clients.lr == lr


@pytest.mark.skipif(not T0.is_dir(), reason="../shared/data/t0 is absent (the T0 data)")
def test_the_fidelity_command_runs_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["fidelity.py", "--model", "tiny-llama", "--methods",
                                      "fedit,fedkseed", "--rounds", "1", "--trials", "2",
                                      "--examples", "4", "--tag", "test"])
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # no re-exec inside pytest
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    fidelity.main()
    out = json.loads((tmp_path / "fidelity_test.json").read_text())
    assert set(out["methods"]) == {"pretrained", "fedit", "fedkseed"}
    for name in ("fedit", "fedkseed"):
        row = out["methods"][name]
        assert len(row["trials"]) == 2
        kept = min(row["trials"], key=lambda t: t["validation_loss"])
        assert (row["lr"], row["server"]) == (kept["lr"], kept["server"])
        for source in ("t0_heldout", "alpaca"):
            q = row[source]
            assert q["examples"] == 4
            assert q["rougeL_ci"][0] <= q["rougeL"] <= q["rougeL_ci"][1]
            assert q["loss_ci"][0] <= q["loss"] <= q["loss_ci"][1]
            assert math.isfinite(q["loss"])
        assert row["up_per_client_round"] > 0 and row["total_bytes"] > 0
    # fedit's LoRA change goes both ways; fedkseed's seed scalars are far smaller
    assert (out["methods"]["fedkseed"]["up_per_client_round"]
            < out["methods"]["fedit"]["up_per_client_round"] / 10)
    table = (tmp_path / "fidelity_test.md").read_text()
    assert "| fedit |" in table and "| fedkseed |" in table
