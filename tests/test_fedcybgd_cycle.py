"""fedcybgd ``schedule = "cycle"`` (the paper's sequential clients): the k-th client trains
block k mod L from the weights the previous one left, the block's optimizer state travels
down and back up and stays with the server (and its checkpoint); ``agg_clients`` averages
a group. On a 3-layer random Llama saved as a local model directory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import fedbits.methods.fedcybgd as fedcybgd
from fedbits.errors import ClientError, ConfigError, WireError
from fedbits.methods import ClientData, get_method
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.store import ClientStores
from fedbits.wire import header_size

from conftest import TINY, assert_same_final_and_ledger, save_small_llama

LAYERS = 3
STEPS = 2  # clients.local_steps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory) -> str:
    """A random 3-layer Llama with the byte tokenizer, as a save_pretrained directory."""
    return save_small_llama(tmp_path_factory.mktemp("models") / "three-layer-llama", LAYERS)


def _overrides(out: Path, model: str, *extra: str) -> list[str]:
    return [f"run.out_dir={out}", f"model.name={model}", "method.name=fedcybgd",
            "method.schedule='cycle'", "clients.per_round=1", f"clients.local_steps={STEPS}",
            "data.num_clients=4", "eval.metrics=['loss']", "eval.max_examples=8", *extra]


def _halves(overrides: list[str]):
    setup = prepare_run(load_config(TINY, overrides))
    ctx = setup.method_context()
    spec = get_method("fedcybgd")
    return setup, spec.server(ctx), spec.client(ctx)


def _data(setup, client: int, round_: int) -> ClientData:
    items, _ = setup.tokenize(setup.clients[client % len(setup.clients)])
    return ClientData(items, setup.pad_id, seed=1000 * round_ + client)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


class Spy:
    """Wraps fedcybgd's train_change: what each client started from and handed back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        real = fedcybgd.train_change

        def spy(model, trained, data, cfg, **kw):
            start = {n: p.detach().clone() for n, p in model.named_parameters()}
            given = {n: {k: v.clone() for k, v in s.items()}
                     for n, s in (kw.get("optimizer_state") or {}).items()}
            change = real(model, trained, data, cfg, **kw)
            self.calls.append({"start": start, "trained": list(trained), "given": given,
                               "returned": change.optimizer_state})
            return change

        monkeypatch.setattr(fedcybgd, "train_change", spy)


def _round(setup, server, client_half, stores, round_: int, clients) -> list:
    downs = {c: server.downlink(round_, c) for c in clients}
    updates = []
    for c in clients:
        up = client_half.update(round_, c, downs[c], _data(setup, c, round_),
                                stores.for_client(c, round_))
        updates.append(server.decode_uplink(round_, c, up.body))
    server.aggregate(round_, updates)
    stores.commit(round_)
    return updates


@pytest.mark.parametrize(("optimizer", "keys"), [
    (["clients.optimizer='adamw'"], {"step", "exp_avg", "exp_avg_sq"}),
    (["clients.optimizer='sgd'", "clients.momentum=0.9"], {"momentum_buffer"}),
    # one optimizer per tensor, stepped during backward: the state travels the same way
    (["clients.optimizer_in_backward=true"], {"step", "exp_avg", "exp_avg_sq"}),
])
def test_cycle_trains_block_k_mod_L_from_the_last_weights_and_continues_the_state(
        tmp_path, three_layers, monkeypatch, optimizer, keys):
    setup, server, client = _halves(_overrides(tmp_path, three_layers, *optimizer))
    spy = Spy(monkeypatch)
    stores = ClientStores(tmp_path / "stores")
    rounds = 2 * LAYERS + 1
    for r in range(1, rounds + 1):
        left = {n: p.detach().clone() for n, p in server.model.named_parameters()}
        (update,) = _round(setup, server, client, stores, r, ((r - 1) % 4,))
        k = r - 1
        assert update.block == k % LAYERS
        call = spy.calls[k]
        assert call["trained"] == list(server.s.subset.blocks[k % LAYERS])
        # every weight the client started from is the one the previous client left
        for name, value in call["start"].items():
            assert torch.equal(value, left[name]), (r, name)
        if k < LAYERS:  # the block's first training: a fresh optimizer
            assert call["given"] == {}
        else:  # what the last client of this block returned, bit for bit
            earlier = spy.calls[k - LAYERS]["returned"]
            assert call["given"].keys() == earlier.keys()
            for name, state in call["given"].items():
                assert state.keys() == keys
                if "step" in keys:  # AdamW's bias correction goes on
                    assert state["step"].item() == (k // LAYERS) * STEPS
                for moment in keys - {"step"}:
                    assert torch.equal(state[moment], earlier[name][moment]), (r, name)
        for state in call["returned"].values():
            assert state.keys() == keys
            if "step" in keys:
                assert state["step"].item() == (k // LAYERS + 1) * STEPS
    assert {b: s.step for b, s in server.carry.items()} == {0: 3 * STEPS, 1: 2 * STEPS,
                                                             2: 2 * STEPS}


def test_ledger_counts_the_optimizer_state_and_resume_is_bit_identical(tmp_path, three_layers):
    common = _overrides(tmp_path, three_layers)
    straight = run_experiment(load_config(TINY, common + ["run.name=s", "run.rounds=5"]))
    run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=2"]))
    resumed = run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=5"]),
                             resume=True)
    assert_same_final_and_ledger(straight, resumed)  # the state came back from the checkpoint

    base = dict(prepare_run(load_config(TINY, common)).frozen.model.named_parameters())
    block = sum(p.numel() for n, p in base.items() if ".layers.0." in n)
    moments = 2 * (1 + 8 + 4 * block)  # AdamW's two float32 tensors (dtype, count, values)
    ledger = _rows(straight / "ledger.jsonl")
    up = {x["round"]: x["bytes"] for x in ledger if x["direction"] == "up"}
    down = {x["round"]: x["bytes"] for x in ledger if x["direction"] == "down"}
    head = header_size("fedcybgd")
    # num_samples, train_loss, digest | step + moments | fingerprint, dtype, count, delta
    assert set(up.values()) == {head + 16 + 4 + moments + 8 + 1 + 8 + 4 * block}
    received = {row["round"]: s["blocks_received"] for row in _rows(straight / "metrics.jsonl")
                for s in row.get("client_stats", {}).values()}
    for r, got in down.items():
        updated = received[r]  # blocks changed since the client's last sync
        state = 4 + (moments if r > LAYERS else 0)  # the state once the block has trained
        assert got == head + 8 + 4 + 4 + 1 + 1 + 8 + 4 * block * updated + state, r


def _offsets(numel: int) -> dict[str, int]:
    """Where the fields of a cycle uplink body start (AdamW)."""
    step = 16
    exp_avg = step + 4 + 9
    return {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg + 4 * numel + 9}


@pytest.mark.parametrize(("field", "value", "error", "message"), [
    ("step", 7, ClientError, r"client 0 uplink: optimizer state after step 7, but block 0 went "
                             r"down at step 0 to train 2 steps"),
    ("exp_avg", float("nan"), WireError, r"client 0 uplink: field optimizer.exp_avg: non-finite"),
    ("exp_avg_sq", -1.0, WireError, r"field optimizer.exp_avg_sq: a second moment is negative"),
    ("exp_avg", 1e3, WireError, r"field optimizer.exp_avg: a first moment beyond 7.27"),
    ("truncate", None, WireError, r"client 0 uplink"),
])
def test_hostile_optimizer_state_is_refused_and_the_run_goes_on(
        tmp_path, three_layers, field, value, error, message):
    setup, server, client = _halves(_overrides(tmp_path, three_layers))
    stores = ClientStores(tmp_path / "stores")
    numel = server.s.layouts[0].numel
    body = bytearray(client.update(1, 0, server.downlink(1, 0), _data(setup, 0, 1),
                                   stores.for_client(0, 1)).body)
    at = _offsets(numel)
    if field == "step":
        struct.pack_into("<I", body, at["step"], value)
    elif field == "truncate":
        body = body[: at["exp_avg_sq"] + 5]
    else:
        struct.pack_into("<f", body, at[field] + 4 * 3, value)
    with pytest.raises(error, match=message):
        server.decode_uplink(1, 0, bytes(body))
    # the runtime drops the client; with no update left it does not aggregate the round
    assert server.carry == {} and server.version == [0] * LAYERS
    (update,) = _round(setup, server, client, stores, 2, (1,))  # the cycle goes on
    assert update.block == 1 and server.carry[1].step == STEPS


def test_a_hostile_downlink_state_is_refused_by_the_client(tmp_path, three_layers):
    setup, server, client = _halves(_overrides(tmp_path, three_layers))
    stores = ClientStores(tmp_path / "stores")
    for r in range(1, LAYERS + 1):
        _round(setup, server, client, stores, r, ((r - 1) % 4,))
    numel = server.s.layouts[0].numel
    down = bytearray(server.downlink(LAYERS + 1, 3))  # block 0 again: its state comes down
    struct.pack_into("<f", down, len(down) - 4, float("inf"))  # the last exp_avg_sq value
    with pytest.raises(WireError, match="downlink to client 3: field optimizer.exp_avg_sq: "
                                        "non-finite"):
        client.load(LAYERS + 1, 3, bytes(down), stores.for_client(3, LAYERS + 1))
    assert len(server.carry[0].moments["exp_avg_sq"]) == numel


def test_agg_clients_averages_a_group_and_its_optimizer_state(tmp_path, three_layers, monkeypatch):
    setup, server, client = _halves(_overrides(tmp_path, three_layers, "method.agg_clients=3",
                                               "clients.per_round=3"))
    before = {n: p.detach().clone() for n, p in server.params.items()}
    updates = _round(setup, server, client, ClientStores(tmp_path / "a"), 1, (0, 1, 2))
    assert [u.block for u in updates] == [0, 0, 0]
    total = sum(u.num_samples for u in updates)
    for name in server.s.subset.blocks[0]:
        mean = sum(u.delta[name] * (u.num_samples / total) for u in updates)
        torch.testing.assert_close(server.params[name] - before[name], mean, rtol=1e-5, atol=1e-7)
        assert not torch.equal(updates[0].delta[name], updates[1].delta[name])
    state = server.carry[0]
    assert state.step == STEPS
    for moment, value in state.moments.items():
        mean = sum(u.state.moments[moment] * (u.num_samples / total) for u in updates)
        torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-9)
    (next_block,) = {u.block for u in _round(setup, server, client,
                                              ClientStores(tmp_path / "b"), 2, (1, 2, 3))}
    assert next_block == 1

    # the parallel schedule takes agg_clients too: 6 clients, two blocks of three
    setup, server, client = _halves(_overrides(
        tmp_path, three_layers, "method.schedule='parallel'", "method.agg_clients=3",
        "clients.per_round=6", "data.num_clients=6"))
    updates = _round(setup, server, client, ClientStores(tmp_path / "p"), 1, range(6))
    assert [u.block for u in updates] == [0, 0, 0, 1, 1, 1]
    assert all(u.state is None for u in updates) and server.carry == {}


@pytest.mark.parametrize(("extra", "message"), [
    (["clients.per_round=2"], r"method.schedule = 'cycle' trains one block per round.*"
                              r"clients.per_round must equal method.agg_clients \(1\), got 2"),
    (["method.agg=true", "method.agg_clients=3"],
     r"method.agg = true is the old spelling of agg_clients = 2"),
])
def test_config_errors(tmp_path, three_layers, extra, message):
    with pytest.raises(ConfigError, match=message):
        prepare_run(load_config(TINY, _overrides(tmp_path, three_layers, *extra)))


def test_stepping_in_backward_carries_the_same_state_bit_for_bit(tmp_path, three_layers):
    finals = []
    for in_backward in ("false", "true"):
        setup, server, client = _halves(_overrides(
            tmp_path, three_layers, f"clients.optimizer_in_backward={in_backward}"))
        stores = ClientStores(tmp_path / in_backward)
        for r in range(1, LAYERS + 2):  # block 0 twice: the second time from carried state
            _round(setup, server, client, stores, r, ((r - 1) % 4,))
        finals.append(({n: p.detach().clone() for n, p in server.params.items()},
                       server.carry[0].moments))
    (params_a, moments_a), (params_b, moments_b) = finals
    assert all(torch.equal(params_a[n], params_b[n]) for n in params_a)
    assert all(torch.equal(moments_a[m], moments_b[m]) for m in moments_a)
