"""Sparse federated LoRA (flasc) and codec chains on the dense methods, end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedbits.compress.tensors import write_values
from fedbits.errors import ConfigError
from fedbits.methods import ClientData, get_method
from fedbits.methods._dense import trainable_tensors
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.store import ClientStores
from fedbits.wire import Direction, Writer

from conftest import TINY

FLASC = ["method.name=flasc", "method.lora_r=4", "clients.local_steps=4"]


def _ledger(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]


def _mean_bytes(run_dir: Path, direction: str) -> float:
    rows = [r["bytes"] for r in _ledger(run_dir) if r["direction"] == direction]
    return sum(rows) / len(rows)


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "final").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_flasc_sends_a_fraction_of_fedit_bytes_and_learns(tiny_overrides):
    common = tiny_overrides + ["run.rounds=2", "method.lora_r=4", "clients.local_steps=4",
                               "eval.metrics=['loss']"]
    fedit = run_experiment(load_config(TINY, common + ["run.name=fedit"]))
    flasc = run_experiment(load_config(TINY, common + [
        "run.name=flasc", "method.name=flasc", "method.density_up=0.0625",
        "method.density_down=0.0625", "method.server_opt=avg", "method.server_lr=1.0",
        # the dense adapter learns; the 1/16 download is all LoRA A (B starts at zero) for
        # the first rounds, so the masked one keeps the base model's loss here
        "method.eval_masked=false",
    ]))
    for direction in ("up", "down"):
        ratio = _mean_bytes(fedit, direction) / _mean_bytes(flasc, direction)
        # 16x fewer values, less the index and framing bytes: 12.5x here, 26.5x on smollm2
        assert ratio >= 12, (direction, ratio)
    rows = [json.loads(x) for x in (flasc / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert not any(r["rejected"] for r in rows)


def _halves(tiny_overrides: list[str], extra: list[str]):
    cfg = load_config(TINY, tiny_overrides + FLASC + extra)
    setup = prepare_run(cfg)
    ctx = setup.method_context()
    spec = get_method("flasc")
    items, _ = setup.tokenize(setup.clients[0])
    return spec.server(ctx), spec.client(ctx), ClientData(items, setup.pad_id, seed=7), setup


def test_downlink_is_the_global_top_k_and_client_freeze_keeps_the_mask(tiny_overrides, tmp_path):
    server, client, data, _ = _halves(tiny_overrides, [
        "method.density_down=0.25", "method.density_up=1.0", "method.client_freeze=true"])
    with torch.no_grad():  # B as large as A, so the top-k mixes both (B = 0 would freeze all)
        for p in server.params.values():
            p.copy_(torch.randn_like(p))
    flat = server.layout.flatten(server.params, torch.float32)
    k = int(0.25 * flat.numel())
    want = set(flat.abs().topk(k).indices.tolist())
    stores = ClientStores(tmp_path / "store")
    up = client.update(1, 0, server.downlink(1, 0), data, stores.for_client(0, 1))
    update = server.read_change(1, 0, up.body)
    delta = server.layout.flatten(update.delta, torch.float32)
    moved = set(torch.nonzero(delta).flatten().tolist())
    assert moved and moved <= want  # client_freeze: only received positions change
    trained = server.layout.flatten(client.params, torch.float32)
    outside = torch.ones_like(trained, dtype=torch.bool)
    outside[list(want)] = False
    assert torch.all(trained[outside] == 0)  # zero-filled and kept at zero


def test_downlink_from_init_sends_the_change_and_the_rest_keeps_its_initial_value(
    tiny_overrides, tmp_path
):
    """downlink_base = "init": the top-k is over the change since the seeded initial
    adapter, and a client fills what did not come down with its own initial weights."""
    server, client, data, _ = _halves(tiny_overrides, [
        "method.density_down=0.25", "method.density_up=1.0", "method.client_freeze=true",
        "method.downlink_base='init'"])
    initial = server.layout.flatten(server.params, torch.float32).clone()
    change = torch.randn_like(initial)
    with torch.no_grad():
        for name, c in server.layout.unflatten(change).items():
            server.params[name].add_(c)
    want = change.abs().topk(int(0.25 * change.numel())).indices
    stores = ClientStores(tmp_path / "store")
    up = client.update(1, 0, server.downlink(1, 0), data, stores.for_client(0, 1))
    delta = server.layout.flatten(server.read_change(1, 0, up.body).delta, torch.float32)
    trained = server.layout.flatten(client.params, torch.float32)
    received = trained - delta
    inside = torch.zeros_like(initial, dtype=torch.bool)
    inside[want] = True
    assert torch.equal(trained[~inside], initial[~inside])  # never sent, kept at init
    torch.testing.assert_close(received[inside], initial[inside] + change[inside])
    assert delta[inside].abs().sum() > 0 and torch.all(delta[~inside] == 0)


def test_freeze_a_sends_only_b(tiny_overrides):
    server, _, _, _ = _halves(tiny_overrides, ["method.freeze_a=true"])
    names = server.layout.names
    assert names and all("lora_B" in n for n in names)


def test_density_decays_on_schedule(tiny_overrides):
    cfg = load_config(TINY, tiny_overrides + FLASC + [
        "method.density_up=0.5", "method.density_decay=0.5", "method.decay_every=2"])
    opts = get_method("flasc").options.model_validate(cfg.method.options())
    assert [opts.density(r, Direction.UP) for r in (1, 2, 3, 4, 5)] == [0.5, 0.5, 0.25, 0.25, 0.125]


@pytest.mark.parametrize(
    ("extra", "lr"),
    [([], 1e-3), (["method.server_opt='avg'"], 1.0), (["method.server_opt='fedavgm'"], 1.0),
     (["method.server_opt='fedyogi'"], 1e-3),
     (["method.server_opt='avg'", "method.server_lr=0.5"], 0.5)],
)
def test_server_lr_default_follows_the_server_optimizer(tiny_overrides, extra, lr):
    """FLASC's Adam rate 1e-3 would make plain averaging move the adapter 1000× too little;
    the other adaptive rules share Adam's scale."""
    cfg = load_config(TINY, tiny_overrides + FLASC + extra)
    assert get_method("flasc").options.model_validate(cfg.method.options()).server_lr == lr


def _drift_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and "server_opt = 'avg'" in r.getMessage()
            and "drifts" in r.getMessage()]


def test_plain_averaging_over_a_sparse_download_warns_once_per_run(tiny_overrides, caplog):
    """The run validates the options several times (config, server, client) and still
    says it once, as a log line rather than a warning that shows its source line."""
    caplog.set_level(logging.WARNING, logger="fedbits.methods.flasc")
    cfg = load_config(TINY, tiny_overrides + FLASC + [
        "method.server_opt='avg'", "run.rounds=1", "eval.metrics=['loss']"])
    run_experiment(cfg)
    assert len(_drift_warnings(caplog)) == 1


@pytest.mark.parametrize("extra", [[], ["method.server_opt='avg'", "method.density_down=1.0"]])
def test_fedadam_or_a_dense_download_does_not_warn(tiny_overrides, caplog, extra):
    caplog.set_level(logging.WARNING, logger="fedbits.methods.flasc")
    setup = prepare_run(load_config(TINY, tiny_overrides + FLASC + extra))
    get_method("flasc").server(setup.method_context())
    assert not _drift_warnings(caplog)


@pytest.mark.parametrize("method", ["fedavg", "fedit"])
def test_codec_chains_on_dense_methods(tiny_overrides, method):
    common = tiny_overrides + [f"method.name={method}", "run.rounds=2", "eval.metrics=['loss']"]
    plain = run_experiment(load_config(TINY, common + ["run.name=plain"]))
    packed = run_experiment(load_config(TINY, common + [
        "run.name=packed", "method.uplink=['topk:0.25','int8','zstd']", "method.downlink=['fp16']",
        "method.error_feedback=true",
    ]))
    assert _mean_bytes(packed, "up") < _mean_bytes(plain, "up") / 4
    assert _mean_bytes(packed, "down") < _mean_bytes(plain, "down") * 0.51
    rows = [json.loads(x) for x in (packed / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["rejected"] for r in rows)
    assert all(torch.isfinite(t).all() for t in _final(packed).values())


def test_flasc_with_error_feedback_resumes_bit_identically(tmp_path):
    common = [f"run.out_dir={tmp_path}", *FLASC, "method.error_feedback=true",
              "method.uplink=['int8']", "eval.metrics=['loss']", "method.density_up=0.125"]
    straight = run_experiment(load_config(TINY, common + ["run.name=s", "run.rounds=4"]))
    run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=2"]))
    resumed = run_experiment(load_config(TINY, common + ["run.name=r", "run.rounds=4"]),
                             resume=True)
    want, got = _final(straight), _final(resumed)
    assert want and all(torch.equal(want[k], got[k]) for k in want)
    assert (straight / "ledger.jsonl").read_text() == (resumed / "ledger.jsonl").read_text()


@pytest.mark.parametrize("overrides, message", [
    (["method.name=flasc", "method.uplink=['topk:0.1']"],
     "selects positions, but flasc chooses them itself"),
    (["method.name=fedavg", "method.error_feedback=true"], "error_feedback needs"),
    (["method.name=fedit", "method.uplink=['int9']"], "method.uplink"),
    (["method.name=fedit", "method.uplink=['fp16']", "method.wire_dtype=float16"], "not both"),
    (["method.name=flasc", "method.density_up=0"], "density_up"),
])
def test_bad_compression_options_are_config_errors(tiny_overrides, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, tiny_overrides + overrides)


def test_eval_masked_evaluates_the_download_bit_for_bit(tiny_overrides):
    """eval_masked: the evaluated adapter is exactly what a client decodes from the next
    round's downlink (top-k at density_down), not the dense server adapter."""
    server, client, _, _ = _halves(tiny_overrides, ["method.density_down=0.25"])
    with torch.no_grad():
        for p in server.params.values():
            p.copy_(torch.randn_like(p))
    evaluated = trainable_tensors(server.global_model())
    assert evaluated.keys() == server.params.keys()
    client.fill.receive(client.params, client._received(1, 0, server.downlink(1, 0)).tensors)
    assert all(torch.equal(evaluated[n], client.params[n]) for n in evaluated)
    flat = server.layout.flatten(evaluated, torch.float32)
    assert int(torch.count_nonzero(flat)) == int(0.25 * flat.numel())  # sparse, not dense
    dense, _, _, _ = _halves(tiny_overrides, ["method.density_down=0.25",
                                              "method.eval_masked=false"])
    assert dense.global_model() is dense.model


def test_density_tiers_upload_by_client_id(tiny_overrides):
    """Two tiers: client c uploads at density_tiers[c % 2]; the server decodes each by its
    tier (a wrong density would fail the strict decoder) and the ledger shows both sizes."""
    run = run_experiment(load_config(TINY, tiny_overrides + FLASC + [
        "run.rounds=2", "eval.metrics=['loss']", "method.density_tiers=[0.5, 0.0625]"]))
    up: dict[int, set[int]] = {0: set(), 1: set()}
    for row in _ledger(run):
        if row["direction"] == "up":
            up[row["client"] % 2].add(row["bytes"])
    assert up[0] and up[1] and min(up[0]) > 4 * max(up[1])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and not any(r["rejected"] for r in rows)


@pytest.mark.parametrize("method", ["flasc", "fedit", "fedavg"])
@pytest.mark.parametrize(("weighting", "weights"), [("uniform", (1, 1)), ("samples", (1, 9))])
def test_server_weighting_on_the_dense_methods(tiny_overrides, method, weighting, weights):
    """robust.server_weighting = "uniform" (FLASC's setting) takes the plain mean of the
    changes whatever the claimed sample counts; "samples" weighs them by the claims."""
    cfg = load_config(TINY, tiny_overrides + [
        f"method.name={method}", "method.server_opt=avg", "method.server_lr=1.0",
        *(["method.density_up=1.0"] if method == "flasc" else []),
        "robust.norm_bound=off", "robust.max_weight=1000",
        f"robust.server_weighting={weighting}"])
    server = get_method(method).server(prepare_run(cfg).method_context())
    before = server.layout.flatten(server.params, torch.float32).clone()
    deltas = [torch.full_like(before, 1.0), torch.full_like(before, -3.0)]
    server.downlink(1, 0)
    updates = []
    for client, (claim, delta) in enumerate(zip((10, 90), deltas, strict=True)):
        w = Writer().u32(claim).f32(1.0)
        write_values(w, server.layout, server.layout.unflatten(delta),
                     wire_dtype=torch.float32, chain=server.chains(1, Direction.UP, client),
                     generator=torch.Generator().manual_seed(client))
        updates.append(server.decode_uplink(1, client, w.getvalue()))
    server.aggregate(1, updates)
    after = server.layout.flatten(server.params, torch.float32)
    mean = (weights[0] * deltas[0] + weights[1] * deltas[1]) / sum(weights)
    torch.testing.assert_close(after - before, mean)


@pytest.mark.parametrize("overrides, message", [
    (["method.density_tiers=[0.5]"], "two or more"),
    (["method.density_tiers=[0.5, 0.1]", "method.density_up=0.5"], "not both"),
    (["method.density_tiers=[0.5, 0]"], "density_tiers"),
    (["method.density_tiers=[0.5, 1.5]"], "density_tiers"),
])
def test_bad_density_tiers_are_config_errors(tiny_overrides, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, tiny_overrides + FLASC + overrides)
