"""partial (Ro et al.): the trainable-subset mechanism, frozen weights, uplink bytes,
server optimizers and their resume, strict uplinks."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedbits.config import ModelSection
from fedbits.errors import ClientError, ConfigError, WireError
from fedbits.methods import ClientData, get_method
from fedbits.methods._blocks import (
    BlockSchedule,
    SubsetOptions,
    decoder_layers,
    subset_from_options,
)
from fedbits.models import load_model
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.setup import prepare_run
from fedbits.server_opt import ReddiAdaptive
from fedbits.wire import Layout, Writer, header_size

from conftest import TINY, assert_same_final_and_ledger

FAST = ["eval.metrics=['loss']", "eval.max_examples=8", "clients.local_steps=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def llama_names(layers: int) -> list[str]:
    """Parameter names as a Llama model spells them."""
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        names += [f"model.layers.{i}.self_attn.q_proj.weight",
                  f"model.layers.{i}.mlp.up_proj.weight",
                  f"model.layers.{i}.input_layernorm.weight"]
    return names + ["model.norm.weight", "lm_head.weight"]


def layers_of(names: tuple[str, ...]) -> set[int]:
    return {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}


def subset(num_layers: int = 8, cohort: int = 3, seed: int = 0, **options):
    return subset_from_options(llama_names(num_layers), SubsetOptions(**options), seed=seed,
                               cohort=cohort, model_name="test model")


# ------------------------------------------------------------------ the mechanism


def test_decoder_layers_come_from_llama_gpt2_and_peft_names():
    gpt2, _ = load_model(ModelSection(name="tiny-gpt2"))
    layers = decoder_layers([n for n, _ in gpt2.named_parameters()])
    assert len(layers) == 2
    assert all(n.startswith(f"transformer.h.{i}.") for i, ls in enumerate(layers) for n in ls)
    peft = ["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert decoder_layers(peft) == [[peft[1]], [peft[0]]]
    with pytest.raises(ConfigError, match="no decoder layers recognisable"):
        decoder_layers([n for n, _ in nn.Linear(2, 2).named_parameters()], "model 'x'")
    with pytest.raises(ConfigError, match="not 0..1"):
        decoder_layers(["model.layers.0.w", "model.layers.2.w"])


def test_layer_ranges_fractions_placements_and_patterns():
    assert layers_of(subset(layer_fraction=0.25).blocks[0]) == {6, 7}
    assert layers_of(subset(layer_fraction=0.25, placement="bottom").blocks[0]) == {0, 1}
    assert layers_of(subset(layer_fraction=0.25, placement="spread").blocks[0]) == {2, 6}
    assert layers_of(subset(layer_fraction=0.3).blocks[0]) == {5, 6, 7}  # rounded up
    assert layers_of(subset(layers=[0, "2-3", -1]).blocks[0]) == {0, 2, 3, 7}
    s = subset(layer_fraction=0.125, include=["model.norm.*"], exclude=["*.mlp.*"])
    assert s.blocks[0] == ("model.layers.7.self_attn.q_proj.weight",
                           "model.layers.7.input_layernorm.weight", "model.norm.weight")
    assert subset(layer_fraction=0, include=["lm_head.*"]).blocks == (("lm_head.weight",),)
    with pytest.raises(ConfigError, match="method.include: 'head.*' matches no trainable"):
        subset(include=["head.*"])
    with pytest.raises(ConfigError, match="outside the model's layers 0..7"):
        subset(layers=["6-8"])


def test_options_refuse_contradictions_naming_the_key(tiny_overrides):
    with pytest.raises(ConfigError, match="method.schedule: .*schedule 'round' cycles"):
        load_config(TINY, tiny_overrides + ["method.name=partial", "method.schedule=round",
                                            "method.layers=[1]"])
    with pytest.raises(ConfigError, match="method.include: .*nothing to train"):
        load_config(TINY, tiny_overrides + ["method.name=partial", "method.layer_fraction=0"])
    with pytest.raises(ConfigError, match="method.layers"):
        load_config(TINY, tiny_overrides + ["method.name=partial", "method.layers=['1-x']"])


def test_cycling_schedules_visit_every_block_once_per_cycle():
    by_round = subset(layer_fraction=0.25, schedule="round")
    assert [layers_of(by_round.select(r, 0)[1]) for r in (1, 2, 3, 4, 5)] == [
        {0, 1}, {2, 3}, {4, 5}, {6, 7}, {0, 1}]
    assert [by_round.select(r, s)[0] for r in (1, 2) for s in (0, 1, 2)] == [0, 0, 0, 1, 1, 1]
    down = subset(layer_fraction=0.25, schedule="round", order="descending")
    assert [down.select(r, 0)[0] for r in range(1, 6)] == [3, 2, 1, 0, 3]
    spread = subset(layer_fraction=0.25, schedule="round", placement="spread")
    assert [layers_of(b) for b in spread.blocks] == [{0, 4}, {1, 5}, {2, 6}, {3, 7}]

    # a different block per client: (r-1)*m + slot, continuing across rounds
    per_client = subset(layer_fraction=0.25, schedule="client", cohort=3)
    assert [[per_client.select(r, s)[0] for s in range(3)] for r in (1, 2, 3)] == [
        [0, 1, 2], [3, 0, 1], [2, 3, 0]]
    two_each = BlockSchedule(4, "client", "ascending", seed=0, cohort=4, per_block=2)
    assert [two_each.block(r, s) for r in (1, 2, 3) for s in range(4)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1]

    def cycles(seed: int) -> list[list[int]]:
        s = subset(layer_fraction=0.25, schedule="round", order="random", seed=seed)
        return [[s.select(4 * c + i + 1, 0)[0] for i in range(4)] for c in range(6)]

    a = cycles(0)
    assert all(sorted(c) == [0, 1, 2, 3] for c in a)  # each block once per cycle
    assert len({tuple(c) for c in a}) > 1  # a fresh permutation per cycle
    assert a == cycles(0) and a != cycles(1)  # a function of the run seed


# ------------------------------------------------------------------ runs


def _halves(overrides: list[str]):
    cfg = load_config(TINY, overrides)
    setup = prepare_run(cfg)
    ctx = setup.method_context()
    spec = get_method(cfg.method.name)
    return setup, spec.server(ctx), spec.client(ctx)


def _data(setup, client: int, round_: int) -> ClientData:
    items, _ = setup.tokenize(setup.clients[client])
    return ClientData(items, setup.pad_id, seed=1000 * round_ + client)


def _round(setup, server, client_half, round_: int, clients=(0,)) -> tuple[list, dict]:
    """The round's updates and the server's stats (every downlink before any uplink)."""
    downs = {c: server.downlink(round_, c) for c in clients}
    updates = []
    for c in clients:
        up = client_half.update(round_, c, downs[c], _data(setup, c, round_), None)
        updates.append(server.decode_uplink(round_, c, up.body))
    return updates, server.aggregate(round_, updates)


def _ledger(run_dir: Path, direction: str) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return [r["bytes"] for r in rows if r["direction"] == direction]


def test_quarter_model_int8_sends_a_fraction_of_fedavg_and_frozen_weights_stay_pretrained(
    tiny_overrides,
):
    cfg = load_config(TINY, tiny_overrides + FAST + [
        "run.rounds=2", "method.name=partial", "method.layer_fraction=0.5",
        "method.uplink=['int8']"])
    partial = run_experiment(cfg)
    setup = prepare_run(cfg)
    base = dict(setup.frozen.model.named_parameters())
    top = {n: p for n, p in base.items() if ".layers.1." in n}
    n = sum(p.numel() for p in top.values())
    # envelope + num_samples + train_loss + fingerprint + chain frame (7)
    # + int8 (scale per 64 + codes)
    want = header_size("partial") + 4 + 4 + 8 + 7 + 4 * math.ceil(n / 64) + n
    assert set(_ledger(partial, "up")) == {want}
    assert set(_ledger(partial, "down")) == {header_size("partial") + 4 + 8 + 1 + 8 + 4 * n}
    # fedavg's uplink (tests/test_methods.py): the same framing around every weight in float32
    fedavg = header_size("fedavg") + 4 + 4 + 8 + 1 + 8 + 4 * sum(p.numel() for p in base.values())
    assert fedavg / want > 9  # 1/2.8 of the weights at 1/3.76 of the width

    final = load_file(next((partial / "final").glob("*.safetensors")))
    for name, p in base.items():
        if name in top:
            assert not torch.equal(final[name], p), name
        else:
            assert torch.equal(final[name], p), f"{name} left its pretrained value"
    rows = [json.loads(x) for x in (partial / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert {s["trained_params"] for s in rows[1]["client_stats"].values()} == {n}


def test_frozen_parameters_get_no_gradient(tiny_overrides):
    setup, server, client = _halves(tiny_overrides + FAST + [
        "method.name=partial", "method.schedule=round", "method.layer_fraction=0.5",
        "method.include=['model.norm.*']"])
    # round 1 trains part of what can change
    assert len(server.params) > len(server.subset.blocks[0])
    _round(setup, server, client, 1)
    for name, p in client.model.named_parameters():
        trained = name.startswith("model.layers.0.") or name == "model.norm.weight"
        assert p.requires_grad == trained, name
        assert p.grad is None, name  # zero_grad(set_to_none) for trained, never computed for frozen


def test_round_schedule_updates_only_that_rounds_block(tiny_overrides):
    setup, server, client = _halves(tiny_overrides + FAST + [
        "method.name=partial", "method.schedule=round", "method.layer_fraction=0.5",
        "method.uplink=[]", "clients.per_round=2"])
    before = {n: p.detach().clone() for n, p in server.params.items()}
    updates, stats = _round(setup, server, client, 1, clients=(0, 1))
    assert all(set(u.delta) == set(server.subset.blocks[0]) for u in updates)
    for name, p in server.params.items():
        assert torch.equal(p, before[name]) == (".layers.1." in name), name
    assert stats == {"tensors_updated": len(server.subset.blocks[0])}
    _round(setup, server, client, 2, clients=(0, 1))
    assert all(not torch.equal(p, before[n]) for n, p in server.params.items())


def test_lora_trains_only_the_adapters_of_the_selected_layers(tiny_overrides):
    setup, server, client = _halves(tiny_overrides + FAST + [
        "method.name=partial", "method.lora=true", "method.lora_r=2", "method.layer_fraction=0.5"])
    assert server.params and all("lora_" in n and ".layers.1." in n for n in server.params)
    before = {n: p.detach().clone() for n, p in server.model.named_parameters()}
    _round(setup, server, client, 1)
    changed = {n for n, p in server.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(server.params)


def test_reddi_rules_match_the_formulas():
    w0, g1, g2 = torch.tensor([0.5, -1.0]), torch.tensor([0.2, -0.4]), torch.tensor([-0.1, 0.3])
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    for rule in ("yogi", "adagrad"):
        w = w0.clone().requires_grad_(True)
        opt = ReddiAdaptive([w], lr=lr, betas=(b1, b2), eps=tau, rule=rule)
        m, v, want = torch.zeros(2), torch.full((2,), tau * tau), w0.clone()
        for g in (g1, g2):
            w.grad = g.clone()
            opt.step()
            m = b1 * m + (1 - b1) * g
            v = v + g * g if rule == "adagrad" else v - (1 - b2) * g * g * torch.sign(v - g * g)
            want = want - lr * m / (v.sqrt() + tau)
        torch.testing.assert_close(w.detach(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opt", ["avg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_every_server_optimizer_resumes_bit_exactly(tiny_overrides, opt):
    """3 rounds straight == 2 rounds, checkpoint through torch.save/load, 1 more round."""
    overrides = tiny_overrides + FAST + ["method.name=partial", "method.schedule=round",
                                         "method.layer_fraction=0.5", f"method.server_opt={opt}",
                                         "method.server_lr=0.05"]
    setup, straight, client = _halves(overrides)
    for r in (1, 2, 3):
        _round(setup, straight, client, r, clients=(r % 3,))

    first = get_method("partial").server(setup.method_context())
    for r in (1, 2):
        _round(setup, first, client, r, clients=(r % 3,))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = get_method("partial").server(setup.method_context())
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _round(setup, resumed, client, 3, clients=(0,))
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
    if opt != "avg":  # the state is real: a fresh optimizer would step differently
        assert straight.optimizer.state_dict()["state"]
        fresh = get_method("partial").server(setup.method_context())
        fresh.load_state_dict({"params": first.state_dict()["params"],
                               "optimizer": fresh.optimizer.state_dict()})
        _round(setup, fresh, client, 3, clients=(0,))
        assert any(not torch.equal(p, fresh.params[n]) for n, p in straight.params.items())


def test_fedyogi_run_resumes_from_its_checkpoint(tmp_path):
    common = FAST + [f"run.out_dir={tmp_path}", "method.name=partial", "method.server_opt=fedyogi",
                     "method.server_lr=0.01", "method.schedule=client", "method.layer_fraction=0.5"]
    straight = run_experiment(load_config(TINY, common + ["run.name=s", "run.rounds=2"]))
    run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=1"]))
    resumed = run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=2"]),
                             resume=True)
    assert_same_final_and_ledger(straight, resumed)


def test_bad_uplinks_are_rejected_naming_the_client(tiny_overrides):
    setup, server, client = _halves(tiny_overrides + FAST + [
        "method.name=partial", "method.uplink=[]", "method.layer_fraction=0.5"])
    layout = server.block_layout(0)
    nan = torch.zeros(layout.numel)
    nan[5] = math.nan
    body = Writer().u32(4).f32(1.0).u64(layout.fingerprint).u8(1).u64(layout.numel)
    payload = body.raw(nan.numpy().tobytes()).getvalue()  # a body: the runtime opens envelopes
    with pytest.raises(ClientError, match="client 2 uplink: no downlink was sent"):
        server.decode_uplink(1, 2, payload)
    server.downlink(1, 2)
    with pytest.raises(ClientError, match="client 2 uplink: non-finite values"):
        server.decode_uplink(1, 2, payload)
    with pytest.raises(WireError, match="client 2 uplink: .*(truncated|remain)"):
        server.decode_uplink(1, 2, payload[:-9])
    elsewhere = Layout.of({"other.weight": torch.zeros(layout.numel)}).fingerprint
    foreign = Writer().u32(4).f32(1.0).u64(elsewhere).u8(1).u64(layout.numel)
    foreign.raw(torch.zeros(layout.numel).numpy().tobytes())
    with pytest.raises(WireError, match="fingerprint"):  # values of another block or model
        server.decode_uplink(1, 2, foreign.getvalue())
    good = client.update(1, 2, server.downlink(1, 2), _data(setup, 2, 1), None)
    server.aggregate(1, [server.decode_uplink(1, 2, good.body)])  # the round goes on with good ones


@pytest.mark.parametrize("base", ["zero", "init"])
def test_sparse_downlink_fills_what_was_not_sent_by_downlink_base(tiny_overrides, base):
    setup, server, client = _halves(tiny_overrides + FAST + [
        "method.name=partial", "method.layer_fraction=0.5", "method.uplink=[]",
        "method.downlink=['topk:0.25']", f"method.downlink_base='{base}'"])
    initial = server.layout.flatten(server.params, torch.float32).clone()
    change = torch.randn_like(initial)
    with torch.no_grad():
        for name, c in server.layout.unflatten(change).items():
            server.params[name].add_(c)
    sent = server.params if base == "zero" else server.layout.unflatten(change)
    sent_flat = server.layout.flatten(sent, torch.float32)
    top = torch.zeros_like(initial, dtype=torch.bool)
    top[sent_flat.abs().topk(int(0.25 * initial.numel())).indices] = True
    (update,), _ = _round(setup, server, client, 1)
    received = server.layout.flatten(client.params, torch.float32) - server.layout.flatten(
        update.delta, torch.float32)
    fill = initial if base == "init" else torch.zeros_like(initial)
    torch.testing.assert_close(received[~top], fill[~top])
    torch.testing.assert_close(received[top], (initial + change)[top])
