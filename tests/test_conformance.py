"""The method contract, held for every registered method (plugins included).

Whatever a method does inside its halves, the runtime promises the same things for
it: the ledger records exactly the bytes that crossed, the payload-size limit holds, a
client whose update is corrupted or who crashes costs only its own update, and a resumed
run ends bit for bit where an uninterrupted one does. Each check runs the real
simulator on the tiny model; faults are injected at the transport, where they happen.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from fedbits.errors import NoUpdateAccepted
from fedbits.methods import available_methods
from fedbits.resolve import load_config
from fedbits.runtime import check_run_dir, execute, open_run_dir
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.simulation import Reply, Settle, Simulation

from conftest import TINY, assert_same_final_and_ledger

METHODS = [name for name in available_methods() if not name.startswith("test-")]
CONTRACT_RUN = ["run.rounds=2", "eval.metrics=['loss']", "eval.max_examples=4",
                "clients.local_steps=2", "data.num_clients=4", "clients.per_round=3"]


def _overrides(tmp_path: Path, method: str, name: str, *extra: str) -> list[str]:
    return [f"run.out_dir={tmp_path}", f"run.name={name}", f"method.name={method}",
            *CONTRACT_RUN, *extra]


class RecordingSimulation(Simulation):
    """The simulator, noting the length of every payload as it crosses."""

    crossed: dict[tuple[int, int, str], int]

    def exchange(self, round_: int, downlinks: dict[int, bytes], settle: Settle) -> None:
        def record(client: int, downlink: bytes, reply: Reply) -> None:
            self.crossed[(round_, client, "down")] += len(downlink)
            if reply.uplink is not None:
                self.crossed[(round_, client, "up")] += len(reply.uplink)
            settle(client, downlink, reply)

        super().exchange(round_, downlinks, record)


class FaultySimulation(Simulation):
    """The simulator over a bad network: the first sampled client's uplink arrives with
    one byte flipped, the second client's process dies before it answers."""

    def exchange(self, round_: int, downlinks: dict[int, bytes], settle: Settle) -> None:
        clients = list(downlinks)

        def faulty(client: int, downlink: bytes, reply: Reply) -> None:
            if client == clients[0] and reply.uplink:
                flipped = bytearray(reply.uplink)
                flipped[len(flipped) // 2] ^= 0x10
                reply = Reply(bytes(flipped), stats=reply.stats)
            elif client == clients[1]:
                reply = Reply(error="the client's process died mid-update")
            settle(client, downlink, reply)

        super().exchange(round_, downlinks, faulty)


def _run(loop_type: type[Simulation], overrides: list[str]) -> Simulation:
    cfg = load_config(TINY, overrides)
    run_dir = check_run_dir(cfg, resume=False, overwrite=False)
    loop = loop_type(prepare_run(cfg), run_dir)
    open_run_dir(cfg, resume=False, overwrite=False)
    if isinstance(loop, RecordingSimulation):
        loop.crossed = defaultdict(int)
    execute(loop)
    return loop


def _rows(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).open()]


@pytest.mark.parametrize("method", METHODS)
def test_the_ledger_records_exactly_the_bytes_that_crossed(tmp_path, method):
    loop = _run(RecordingSimulation, _overrides(tmp_path, method, "rec"))
    assert isinstance(loop, RecordingSimulation)
    booked: dict[tuple[int, int, str], int] = defaultdict(int)
    for row in _rows(loop.run_dir, "ledger.jsonl"):
        booked[(row["round"], row["client"], row["direction"])] += row["bytes"]
    assert booked == loop.crossed
    assert {d for (_, _, d) in booked} == {"up", "down"}
    for row in _rows(loop.run_dir, "metrics.jsonl")[1:]:
        ups = {k[1]: v for k, v in booked.items() if k[0] == row["round"] and k[2] == "up"}
        assert row["bytes_up"] == sum(ups.values())
        assert row["bytes_up_per_client"] == {str(c): n for c, n in ups.items()}


@pytest.mark.parametrize("method", METHODS)
def test_the_payload_size_limit_holds(tmp_path, method):
    smallest = min(row["bytes"] for row in _rows(
        _run(Simulation, _overrides(tmp_path, method, "free")).run_dir, "ledger.jsonl"))
    limit_mb = (smallest - 1) / 1e6
    with pytest.raises(NoUpdateAccepted):
        _run(Simulation, _overrides(tmp_path, method, "capped",
                                    f"runtime.max_payload_mb={limit_mb!r}"))
    for row in _rows(tmp_path / "capped", "metrics.jsonl")[1:]:
        assert set(row["rejected"]) == {str(c) for c in row["clients"]}
        assert all("exceeds the limit" in why for why in row["rejected"].values()), row


@pytest.mark.parametrize("method", METHODS)
def test_a_corrupted_or_crashed_client_costs_only_its_own_update(tmp_path, method):
    loop = _run(FaultySimulation, _overrides(tmp_path, method, "faulty"))
    for row in _rows(loop.run_dir, "metrics.jsonl")[1:]:
        first, second, *rest = row["clients"]
        assert set(row["rejected"]) == {str(first), str(second)}, row["rejected"]
        assert "died" in row["rejected"][str(second)]
        assert rest and row["train_loss"] is not None  # the third client's update counted


@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_exact(tmp_path, method):
    straight = _run(Simulation, _overrides(tmp_path, method, "straight")).run_dir
    _run(Simulation, _overrides(tmp_path, method, "resumed", "run.rounds=1"))
    cfg = load_config(TINY, _overrides(tmp_path, method, "resumed"))
    loop = Simulation(prepare_run(cfg), check_run_dir(cfg, True, False))
    execute(loop, resume=True)
    assert [r["round"] for r in _rows(loop.run_dir, "metrics.jsonl")] == [0, 1, 2]
    assert_same_final_and_ledger(straight, loop.run_dir)
