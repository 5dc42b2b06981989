"""The simulator end to end: outputs, determinism, rejection, crash + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedbits.methods import MethodSpec, register
from fedbits.methods._dense import DenseClient, DenseServer
from fedbits.methods.fedavg import FedAvgOptions, _prepare
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment

from conftest import REPO, TINY


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"no safetensors in {run_dir / 'final'}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_run_writes_everything(tiny_overrides):
    run_dir = run_experiment(load_config(TINY, tiny_overrides))
    for name in ("config.toml", "metrics.jsonl", "ledger.jsonl", "report.md",
                 "checkpoints/latest.pt", "final/adapter_config.json"):
        assert (run_dir / name).exists(), name
    rows = _rows(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for key in ("round", "clients", "bytes_up", "bytes_down", "train_loss", "seconds",
                "peak_rss_mb", "eval_loss", "exact_match"):
        assert key in rows[-1], key
    assert rows[0]["bytes_up"] == 0 and rows[-1]["bytes_up"] > 0
    assert rows[-1]["cum_bytes"] == sum(r["bytes_up"] + r["bytes_down"] for r in rows)


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = run_experiment(load_config(TINY, [f"run.out_dir={tmp_path}", "run.name=a"]))
    b = run_experiment(load_config(TINY, [f"run.out_dir={tmp_path}", "run.name=b"]))
    c = run_experiment(load_config(TINY, [f"run.out_dir={tmp_path}", "run.name=c", "run.seed=1"]))
    wa, wb, wc = _final_weights(a), _final_weights(b), _final_weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


class _CorruptingClient(DenseClient):
    """Cuts the last byte off client 0's uplink body (sealed intact: the envelope cannot
    tell); the server's decoding must reject just that client."""

    def update(self, round_, client, downlink, data, store):
        result = super().update(round_, client, downlink, data, store)
        if client == 0:
            result.body = result.body[:-1]
        return result


register(MethodSpec("test-corrupt", FedAvgOptions, lambda ctx: DenseServer(ctx, _prepare),
                    lambda ctx: _CorruptingClient(ctx, _prepare)))


def test_bad_client_is_rejected_and_round_continues(tiny_overrides):
    cfg = load_config(TINY, tiny_overrides + ["method.name=test-corrupt", "data.num_clients=3",
                                              "data.partition=iid", "clients.per_round=3",
                                              "run.rounds=2"])
    run_dir = run_experiment(cfg)
    rows = _rows(run_dir / "metrics.jsonl")
    for row in rows[1:]:
        assert row["clients"] == [0, 1, 2]
        assert list(row["rejected"]) == ["0"]
        assert row["rejected"]["0"].startswith("client 0 uplink: "), row["rejected"]
        assert row["train_loss"] is not None
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedbits.cli", *args]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    common = [f"run.out_dir={tmp_path}", "run.rounds=8", "eval.every=100",
              "eval.metrics=['loss']"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sets = lambda extra: [a for kv in common + extra for a in ("--set", kv)]  # noqa: E731

    ref = subprocess.run(_cli("run", str(TINY), *sets(["run.name=ref"])), env=env,
                         capture_output=True, text=True, cwd=REPO)
    assert ref.returncode == 0, ref.stderr

    victim_dir = tmp_path / "victim"
    proc = subprocess.Popen(_cli("run", str(TINY), *sets(["run.name=victim"])), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 300
    metrics = victim_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(_rows(metrics))
    assert 4 <= done < 9, "the run must be killed mid-way"
    assert not (victim_dir / "final").exists()

    resumed = subprocess.run(_cli("run", str(TINY), *sets(["run.name=victim"]), "--resume"),
                             env=env, capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after round" in resumed.stdout
    want, got = _final_weights(tmp_path / "ref"), _final_weights(victim_dir)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    rows = _rows(metrics)
    assert [r["round"] for r in rows] == list(range(9))
    ref_ledger = (tmp_path / "ref" / "ledger.jsonl").read_text()
    assert (victim_dir / "ledger.jsonl").read_text() == ref_ledger


def test_resume_refuses_a_changed_config(tiny_overrides):
    cfg = load_config(TINY, tiny_overrides + ["run.rounds=1"])
    run_experiment(cfg)
    from fedbits.errors import ConfigError, FedbitsError
    with pytest.raises(ConfigError, match="clients.lr"):
        run_experiment(load_config(TINY, tiny_overrides + ["clients.lr=0.1"]), resume=True)
    with pytest.raises(FedbitsError, match="already exists"):
        run_experiment(cfg)
    # more rounds may be added to a finished run
    run_dir = run_experiment(load_config(TINY, tiny_overrides + ["run.rounds=2"]), resume=True)
    assert [r["round"] for r in _rows(run_dir / "metrics.jsonl")] == [0, 1, 2]


def test_fedadam_state_survives_resume(tmp_path):
    """Adam's moments live in the checkpoint: 2 rounds + resume to 4 == 4 straight."""
    common = [f"run.out_dir={tmp_path}", "method.server_opt=fedadam", "method.server_lr=0.01"]
    straight = run_experiment(load_config(TINY, common + ["run.name=s", "run.rounds=4"]))
    run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=2"]))
    resumed = run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=4"]),
                             resume=True)
    want, got = _final_weights(straight), _final_weights(resumed)
    base = run_experiment(load_config(TINY, common + ["run.name=avg", "run.rounds=4",
                                                      "method.server_opt=avg"]))
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert any(not torch.equal(want[k], _final_weights(base)[k]) for k in want)
