"""The runtime's side of the method contract (docs/methods.md), on methods made to probe it.

The order rule (every downlink of a round before any uplink is decoded), the stats
channels and their keys, one sealed payload for a body shared by every client, the size
limit held before a downlink is sent, and the worked example of docs/methods.md, which
must run as printed.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from fedbits.methods import (
    ClientData,
    ClientResult,
    ClientStore,
    ClientUpdate,
    MethodContext,
    MethodOptions,
    MethodSpec,
    register,
)
from fedbits.resolve import load_config
from fedbits.runtime import check_run_dir, execute, open_run_dir, run_experiment
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.simulation import Settle, Simulation
from fedbits.wire import Reader, Writer, header_size

from conftest import REPO, TINY

QUICK = ["eval.metrics=['loss']", "eval.max_examples=4", "data.num_clients=4",
         "clients.per_round=3"]


class _CountingServer:
    """Its downlink body is one byte per uplink it has decoded so far: a downlink that
    depends on ``decode_uplink``. Under the order rule every client of a round gets the
    same body; settled one client at a time they would get 0, 1, 2 bytes."""

    def __init__(self, ctx: MethodContext) -> None:
        self.model = ctx.build_model()
        self.decoded = 0

    def downlink(self, round_: int, client: int) -> bytes:
        return bytes(self.decoded)

    def decode_uplink(self, round_: int, client: int, body: bytes) -> ClientUpdate:
        r = Reader(body, f"client {client} uplink")
        samples = r.u32("num_samples")
        r.finish()
        self.decoded += 1
        return ClientUpdate(client, samples, 0.0)

    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> dict[str, float]:
        # a stat named like a runtime key: it must stay under server_stats
        return {"decoded": self.decoded, "bytes_up": -1}

    def global_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"decoded": self.decoded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decoded = state["decoded"]

    def save_final(self, path: Path) -> None:
        self.model.save_pretrained(path)


class _CountingClient:
    def __init__(self, ctx: MethodContext) -> None:
        pass

    def update(self, round_: int, client: int, downlink: bytes, data: ClientData,
               store: ClientStore) -> ClientResult:
        return ClientResult(Writer().u32(data.num_samples).getvalue(),
                            stats={"received": len(downlink), "train_loss": -1})


register(MethodSpec("test-counting", MethodOptions, _CountingServer, _CountingClient))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_downlink_of_a_round_is_encoded_before_any_uplink_is_decoded(tmp_path):
    run_dir = run_experiment(load_config(TINY, [f"run.out_dir={tmp_path}", "run.rounds=3",
                                                "method.name=test-counting", *QUICK]))
    header = header_size("test-counting")
    downs: dict[int, list[int]] = {}
    for row in _rows(run_dir / "ledger.jsonl"):
        if row["direction"] == "down":
            downs.setdefault(row["round"], []).append(row["bytes"] - header)
    # 3 clients a round: every downlink of round r carries the 3 (r - 1) uplinks decoded
    # in the rounds before it, none of its own round's
    assert downs == {1: [0, 0, 0], 2: [3, 3, 3], 3: [6, 6, 6]}
    for row in _rows(run_dir / "metrics.jsonl")[1:]:
        assert row["client_stats"] == {str(c): {"received": 3.0 * (row["round"] - 1),
                                                "train_loss": -1.0} for c in row["clients"]}
        # the method's stats live under their own keys, never over the runtime's
        assert row["server_stats"] == {"decoded": 3.0 * row["round"], "bytes_up": -1.0}
        assert row["bytes_up"] == 3 * (header + 4) and row["train_loss"] == 0.0


class _SharedBodyRecorder(Simulation):
    """Notes each sealed downlink object as the runtime hands it over."""

    sent: list[dict[int, bytes]]

    def exchange(self, round_: int, downlinks: dict[int, bytes], settle: Settle) -> None:
        self.sent.append(dict(downlinks))
        super().exchange(round_, downlinks, settle)


def test_a_body_shared_by_every_client_is_sealed_once(tmp_path):
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", "run.rounds=2", *QUICK])  # fedit
    loop = _SharedBodyRecorder(prepare_run(cfg), check_run_dir(cfg, False, False))
    loop.sent = []
    open_run_dir(cfg, False, False)
    execute(loop)
    assert len(loop.sent) == 2
    for downlinks in loop.sent:
        assert len(downlinks) == 3 and len({id(d) for d in downlinks.values()}) == 1


def test_an_oversized_downlink_is_refused_before_it_is_sent(tmp_path):
    # bodies of 4 bytes fit: the uplinks, and round 2's downlinks (3 bytes); round 3's
    # downlinks carry 6 and do not
    header = header_size("test-counting")
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", "run.rounds=3",
                             "method.name=test-counting", *QUICK,
                             f"runtime.max_payload_mb={(header + 4.5) / 1e6!r}"])
    limit = int(cfg.runtime.max_payload_mb * 1_000_000)
    assert limit == header + 4
    run_dir = run_experiment(cfg)
    third = _rows(run_dir / "metrics.jsonl")[3]
    assert third["rejected"] == {
        str(c): f"downlink to client {c}: {header + 6} bytes exceeds the limit of {limit}"
        for c in third["clients"]}
    ledger = _rows(run_dir / "ledger.jsonl")
    assert [r["round"] for r in ledger] == [1] * 6 + [2] * 6  # nothing of round 3 crossed


def _docs_example(tmp_path: Path, name: str) -> None:
    """Import the complete method of docs/methods.md, registered as ``name``."""
    text = (REPO / "docs" / "methods.md").read_text()
    [code] = [block for block in re.findall(r"```python\n(.*?)```", text, re.S)
              if block.startswith("# fedsgd.py")]
    assert code.count('name="fedsgd"') == 1
    path = tmp_path / "fedsgd_example.py"
    path.write_text(code.replace('name="fedsgd"', f'name="{name}"'))
    spec = importlib.util.spec_from_file_location("fedsgd_example", path)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_the_worked_example_in_docs_runs_and_learns(tmp_path):
    _docs_example(tmp_path, "test-fedsgd")
    run_dir = run_experiment(load_config(TINY, [f"run.out_dir={tmp_path}", "run.rounds=2",
                                                "method.name=test-fedsgd", *QUICK]))
    rows = _rows(run_dir / "metrics.jsonl")
    assert all(not row["rejected"] for row in rows)
    assert rows[2]["eval_loss"] < rows[1]["eval_loss"] < rows[0]["eval_loss"]
    assert [row["server_stats"] for row in rows[1:]] == [{"steps_applied": 3.0}] * 2
    # 3 of 4 clients a round: some took part in both, and their store remembered round 1
    taken = [s["rounds_taken"] for row in rows[1:] for s in row["client_stats"].values()]
    assert sorted(taken) == [1.0] * 4 + [2.0] * 2
    assert (run_dir / "final" / "model.safetensors").is_file()
