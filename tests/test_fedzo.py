"""FedZO on the tiny model: it learns, its bytes are the dense model both ways, a run
is reproducible bit for bit, and a step of several directions is their mean at one point."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_zo import _batch, _tiny

from fedbits.methods import get_method
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.setup import prepare_run
from fedbits.wire import header_size
from fedbits.zo.step import ZeroOrderTrainer

from conftest import TINY, assert_same_final_and_ledger

RUN = ["method.name=fedzo", "run.rounds=3", "clients.local_steps=8", "clients.batch_size=2",
       "clients.lr=0.001", "eval.metrics=['loss']"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fedzo_learns_and_sends_the_dense_model_both_ways(tmp_path):
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", *RUN])
    rows = _rows(run_experiment(cfg))
    assert all(not r["rejected"] for r in rows)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    numel = get_method("fedzo").server(prepare_run(cfg).method_context()).layout.numel
    # every weight as float32 each way, plus the envelope and a few bytes that frame the
    # block (the layout's fingerprint, the values' type and count: 17 measured); the
    # uplink adds num_samples (u32) and the loss (f32)
    for r in rows[1:]:
        for client in map(str, r["clients"]):
            up, down = r["bytes_up_per_client"][client], r["bytes_down_per_client"][client]
            assert 0 < down - numel * 4 - header_size("fedzo") <= 32
            assert up - down == 8


def test_the_same_seed_gives_the_same_run_bit_for_bit(tmp_path):
    runs = [run_experiment(load_config(TINY, [f"run.out_dir={tmp_path}", f"run.name={name}",
                                              *RUN, "run.rounds=2", "clients.local_steps=3",
                                              "method.num_directions=2",
                                              "clients.weight_decay=0.1"]))
            for name in ("a", "b")]
    assert_same_final_and_ledger(*runs)


def test_a_step_of_several_directions_is_their_mean_at_one_point():
    """Two estimates at the same weights, then one update by their mean, decayed once:
    what the client does for num_directions = 2, against the update written out."""
    model, want = _tiny(), _tiny()
    lr, wd, eps = 1e-2, 0.1, 1e-3
    trainer = ZeroOrderTrainer(model, eps=eps, lr=lr, weight_decay=wd)
    with trainer.attached():
        estimates = [(seed, trainer.step(seed, _batch(0), update=False)[2]) for seed in (7, 8)]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), want.parameters(),
                                                 strict=True))  # estimating moved nothing
    (_, g7), (_, g8) = estimates
    assert g7 is not None and g8 is not None and g7 != g8
    trainer.apply_step(7, g7 / 2)
    trainer.apply_step(8, g8 / 2, decay=False)
    # the same update through the one-direction path: decay with the first, not the second
    reference = ZeroOrderTrainer(want, eps=eps, lr=lr, weight_decay=wd)
    reference.apply_step(7, g7 / 2)
    ZeroOrderTrainer(want, eps=eps, lr=lr, weight_decay=0.0).apply_step(8, g8 / 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), want.parameters(),
                                                 strict=True))
