"""Methods through the real runtime: byte counts, FedAvg equivalence, rejection."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from fedbits.data.batching import iterate_batches
from fedbits.errors import ClientError, WireError
from fedbits.methods import available_methods, get_method
from fedbits.methods._dense import DenseClient, DenseServer
from fedbits.methods.fedavg import _prepare as prepare_full
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.setup import prepare_run
from fedbits.train import make_optimizer
from fedbits.wire import Writer, header_size

from conftest import TINY

BUILTIN_METHODS = {"fedavg", "fedit", "flasc", "partial", "fedcybgd", "fedkseed", "fedkseed-pro",
                   "cgfedllm", "fedzo"}


def test_registry_finds_every_builtin_method_and_nothing_else():
    """In a fresh process (this one holds the tests' own registrations), the registry is
    exactly the built-in methods, each registered under its own name."""
    code = ("from fedbits.methods import available_methods, get_method\n"
            "print(','.join(n for n in available_methods() if get_method(n).name == n))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert set(out.split(",")) == BUILTIN_METHODS
    assert BUILTIN_METHODS <= set(available_methods())


def test_fedit_uplink_is_lora_params_times_width_plus_fixed_header(tiny_overrides):
    cfg = load_config(TINY, tiny_overrides + ["run.rounds=2"])
    run_dir = run_experiment(cfg)
    setup = prepare_run(cfg)
    server = get_method("fedit").server(setup.method_context())
    trainable, _ = server.model.get_nb_trainable_parameters()  # peft's own count
    # envelope + num_samples u32 + train_loss f32 + fingerprint u64 + dtype u8 + count u64
    fixed = header_size("fedit") + 4 + 4 + 8 + 1 + 8
    rows = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    ups = [r for r in rows if r["direction"] == "up"]
    downs = [r for r in rows if r["direction"] == "down"]
    assert len(ups) == 2 * cfg.clients_per_round()
    assert {r["bytes"] for r in ups} == {trainable * 4 + fixed}
    assert {r["bytes"] for r in downs} == {trainable * 4 + header_size("fedit") + 8 + 1 + 8}
    # metrics totals are the ledger's sums
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics[1:]:
        assert m["bytes_up"] == sum(r["bytes"] for r in ups if r["round"] == m["round"])
    # the final adapter loads with peft
    base = setup.build_model()
    loaded = PeftModel.from_pretrained(base, run_dir / "final")
    final_params = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert final_params
    for n, _ in server.model.named_parameters():
        if "lora_" in n:
            assert n in final_params


def test_fedavg_one_client_one_step_equals_centralized_step(tiny_overrides):
    cfg = load_config(TINY, tiny_overrides + [
        "method.name=fedavg", "data.num_clients=1", "data.partition=iid",
        "clients.per_round=1", "clients.local_steps=1", "clients.optimizer=sgd",
        "clients.lr=0.5", "clients.momentum=0.9",
    ])
    setup = prepare_run(cfg)
    ctx = setup.method_context()
    server, client = DenseServer(ctx, prepare_full), DenseClient(ctx, prepare_full)
    items, _ = setup.tokenize(setup.clients[0])
    from fedbits.methods import ClientData
    data = ClientData(items, setup.pad_id, seed=1234)
    up = client.update(1, 0, server.downlink(1, 0), data, store=None)
    server.aggregate(1, [server.decode_uplink(1, 0, up.body)])

    central = prepare_full(setup.build_model())
    params = [p for p in central.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.clients)
    gen = torch.Generator().manual_seed(1234)
    batch = next(iterate_batches(items, cfg.clients.batch_size, 1, gen, setup.pad_id))
    central.train()
    torch.manual_seed(1234)
    central(**batch).loss.backward()
    opt.step()
    changed = 0
    pairs = zip(server.model.named_parameters(), central.named_parameters(), strict=True)
    for (n, p), (n2, q) in pairs:
        assert n == n2
        # w0 + (w1 - w0) can differ from w1 by one rounding of the subtraction
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        changed += int(not torch.equal(q, setup.frozen.model.get_parameter(n)))
    assert changed > 0


def test_bad_uplinks_are_rejected_with_reasons(tiny_overrides):
    cfg = load_config(TINY, tiny_overrides + ["method.name=fedavg"])
    setup = prepare_run(cfg)
    server = get_method("fedavg").server(setup.method_context())
    n = server.layout.numel
    good = Writer().u32(5).f32(1.0).u64(server.layout.fingerprint).u8(1).u64(n)
    nan = torch.zeros(n)
    nan[3] = math.nan
    body = good.raw(nan.numpy().tobytes()).getvalue()  # the runtime opened the envelope
    with pytest.raises(ClientError, match="client 7 uplink: non-finite"):
        server.decode_uplink(1, 7, body)
    with pytest.raises(WireError, match="client 7 uplink: .*(truncated|remain)"):
        server.decode_uplink(1, 7, body[:-50])
