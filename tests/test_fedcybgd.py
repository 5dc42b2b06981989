"""fedcybgd: one block up per client, change-only or paper-style download, overlay,
sync checks, resume — on a 6-layer random Llama saved as a local model directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedbits.errors import ClientError, WireError
from fedbits.methods import ClientData, get_method
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.store import ClientStores
from fedbits.wire import header_size

from conftest import TINY, assert_same_final_and_ledger, save_small_llama

LAYERS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> str:
    """A random 6-layer Llama with the byte tokenizer, as a save_pretrained directory."""
    return save_small_llama(tmp_path_factory.mktemp("models") / "six-layer-llama", LAYERS)


def _overrides(out: Path, model: str, *extra: str) -> list[str]:
    return [f"run.out_dir={out}", f"model.name={model}", "method.name=fedcybgd",
            "clients.per_round=2", "clients.local_steps=2", "eval.metrics=['loss']",
            "eval.max_examples=8", *extra]


def _halves(overrides: list[str]):
    setup = prepare_run(load_config(TINY, overrides))
    ctx = setup.method_context()
    spec = get_method("fedcybgd")
    return setup, spec.server(ctx), spec.client(ctx)


def _data(setup, client: int, round_: int) -> ClientData:
    items, _ = setup.tokenize(setup.clients[client % len(setup.clients)])
    return ClientData(items, setup.pad_id, seed=1000 * round_ + client)


def _round(setup, server, client_half, stores: ClientStores, round_: int, clients) -> list:
    downs = {c: server.downlink(round_, c) for c in clients}  # every downlink before any uplink
    updates = []
    for c in clients:
        up = client_half.update(round_, c, downs[c], _data(setup, c, round_),
                                stores.for_client(c, round_))
        updates.append(server.decode_uplink(round_, c, up.body))
    server.aggregate(round_, updates)
    stores.commit(round_)
    return updates


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_one_block_up_change_only_down_frozen_rest(tmp_path, six_layers):
    cfg = load_config(TINY, _overrides(tmp_path, six_layers, "run.rounds=5"))
    run_dir = run_experiment(cfg)
    base = dict(prepare_run(cfg).frozen.model.named_parameters())
    block = sum(p.numel() for n, p in base.items() if ".layers.0." in n)
    full_model = 4 * sum(p.numel() for p in base.values())

    metrics, ledger = _rows(run_dir / "metrics.jsonl"), _rows(run_dir / "ledger.jsonl")
    # envelope + num_samples + train_loss + digest + fingerprint + dtype + count + the block
    up = header_size("fedcybgd") + 4 + 4 + 8 + 8 + 1 + 8 + 4 * block
    assert {r["bytes"] for r in ledger if r["direction"] == "up"} == {up}

    # an independent account of what each download must hold
    version, synced = [0] * LAYERS, {}
    late_downloads = []
    for row in metrics[1:]:
        r = row["round"]
        assert not row["rejected"]
        stats = row["client_stats"]
        want_blocks = [(2 * (r - 1) + s) % LAYERS for s in range(2)]
        assert [stats[str(c)]["block"] for c in row["clients"]] == want_blocks
        for c in row["clients"]:
            since = synced.pop(c, 0)
            blocks = sum(v > since for v in version)
            assert stats[str(c)]["blocks_received"] == blocks
            down = next(x["bytes"] for x in ledger
                        if (x["round"], x["client"], x["direction"]) == (r, c, "down"))
            assert down == header_size("fedcybgd") + 8 + 4 + 4 + 1 + 1 + 8 + 4 * block * blocks
            if r > LAYERS // 2:  # after the first cycle
                late_downloads.append(down)
        for c in row["clients"]:
            version[stats[str(c)]["block"]] = r
            synced[c] = r - 1
    assert late_downloads and max(late_downloads) < full_model
    assert min(late_downloads) < 4 * block * LAYERS  # fewer than all the layers

    final = load_file(next((run_dir / "final").glob("*.safetensors")))
    for name, p in base.items():
        assert torch.equal(final[name], p) == (".layers." not in name), name
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]


def test_a_synced_copy_is_bit_identical_to_the_server(tmp_path, six_layers):
    setup, server, client = _halves(_overrides(tmp_path, six_layers, "data.num_clients=4"))
    stores = ClientStores(tmp_path / "stores")
    for r, clients in enumerate([(0, 1), (2, 3), (0, 2), (1, 3), (0, 3)], start=1):
        _round(setup, server, client, stores, r, clients)
    for c in range(4):
        model, _, received = client.load(6, c, server.downlink(6, c), stores.for_client(c, 6))
        if c == 0:
            assert received == 2  # only what round 5 changed
        for name, p in model.named_parameters():
            assert torch.equal(p, server.model.get_parameter(name)), (c, name)


def test_agg_averages_two_clients_and_otherwise_the_last_writer_wins(tmp_path, six_layers):
    setup, server, client = _halves(_overrides(tmp_path, six_layers, "method.agg=true",
                                               "clients.per_round=4"))
    stores = ClientStores(tmp_path / "agg")
    before = {n: p.detach().clone() for n, p in server.params.items()}
    updates = _round(setup, server, client, stores, 1, (0, 1, 2, 3))
    assert [u.block for u in updates] == [0, 0, 1, 1]
    for block, pair in ((0, updates[:2]), (1, updates[2:])):
        total = sum(u.num_samples for u in pair)
        for name in server.s.subset.blocks[block]:
            mean = sum(u.delta[name] * (u.num_samples / total) for u in pair)
            torch.testing.assert_close(server.params[name] - before[name], mean,
                                       rtol=1e-5, atol=1e-7)
            assert not torch.equal(pair[0].delta[name], pair[1].delta[name])

    setup, server, client = _halves(_overrides(tmp_path, six_layers, "data.num_clients=8",
                                               "clients.per_round=7"))
    before = {n: p.detach().clone() for n, p in server.params.items()}
    updates = _round(setup, server, client, ClientStores(tmp_path / "last"), 1, range(7))
    assert [u.block for u in updates] == [0, 1, 2, 3, 4, 5, 0]
    for name in server.s.subset.blocks[0]:
        assert torch.equal(server.params[name], before[name] + updates[6].delta[name])


def test_paper_download_sends_a_fraction_of_the_updated_blocks(tmp_path, six_layers):
    setup, server, client = _halves(_overrides(tmp_path, six_layers, "method.download=fraction",
                                               "method.download_fraction=0.5"))
    stores = ClientStores(tmp_path / "stores")
    received = []
    for r, clients in enumerate([(0, 1), (2, 3), (4, 5), (0, 1)], start=1):
        server_round = []
        downs = {c: server.downlink(r, c) for c in clients}
        for c in clients:
            up = client.update(r, c, downs[c], _data(setup, c, r), stores.for_client(c, r))
            received.append(up.stats["blocks_received"])
            server_round.append(server.decode_uplink(r, c, up.body))
        server.aggregate(r, server_round)
        stores.commit(r)
    # updated before the round: none, {0,1}, {0..3}, all six; own block comes down when updated
    assert received == [0, 0, 1, 1, 2, 2, 1 + math.ceil(0.5 * 5), 1 + math.ceil(0.5 * 5)]
    assert stores.size_bytes() == 0  # no client state in this mode


def test_stale_store_is_refused_then_resynced_and_a_wrong_start_is_rejected(tmp_path, six_layers):
    setup, server, client = _halves(_overrides(tmp_path, six_layers, "data.num_clients=4"))
    stores = ClientStores(tmp_path / "stores")
    _round(setup, server, client, stores, 1, (0, 1))
    _round(setup, server, client, stores, 2, (0, 1))
    stores.for_client(0, 3).put("fedcybgd-synced", (0).to_bytes(4, "little"))  # lost a sync
    with pytest.raises(ClientError, match="client 0: its store holds the model as of round 0, "
                                          "but the server sent the changes since round 1"):
        client.update(3, 0, server.downlink(3, 0), _data(setup, 0, 3), stores.for_client(0, 3))
    _round(setup, server, client, stores, 3, (1,))  # the round goes on; client 0 was not verified
    model, _, received = client.load(4, 0, server.downlink(4, 0), stores.for_client(0, 4))
    assert received == sum(v > 0 for v in server.version) == 5  # a full resync: all changed so far
    for name, p in model.named_parameters():
        assert torch.equal(p, server.model.get_parameter(name)), name

    up = client.update(5, 2, server.downlink(5, 2), _data(setup, 2, 5),
                       stores.for_client(2, 5)).body
    slot = server.cohort.slots[2]
    with torch.no_grad():
        server.params[server.s.subset.select(5, slot)[1][0]].add_(1e-3)  # the server moved on
    with pytest.raises(ClientError, match="client 2 uplink: trained block .* out of sync"):
        server.decode_uplink(5, 2, up)
    with pytest.raises(WireError, match="client 2 uplink"):
        server.decode_uplink(5, 2, up[:-3])
    with pytest.raises(ClientError, match="client 3 uplink: no downlink was sent"):
        server.decode_uplink(5, 3, up)
    down = bytearray(server.downlink(6, 1))
    down[0] ^= 1  # the body's first field: the fingerprint of the decoder layers' layout
    with pytest.raises(WireError, match="downlink to client 1: layout fingerprint"):
        client.load(6, 1, bytes(down), stores.for_client(1, 6))


def test_resume_is_bit_identical(tmp_path, six_layers):
    common = _overrides(tmp_path, six_layers, "data.num_clients=4")
    straight = run_experiment(load_config(TINY, common + ["run.name=s", "run.rounds=4"]))
    run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=2"]))
    resumed = run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=4"]),
                             resume=True)
    assert_same_final_and_ledger(straight, resumed)
    # a client synced twice before the resume, so its store was in use across it
    assert any(s["blocks_received"] < LAYERS for row in _rows(resumed / "metrics.jsonl")[3:]
               for s in row["client_stats"].values())
