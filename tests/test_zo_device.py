"""FedKSeed's zeroth-order engine on CUDA: the same bits as on the CPU.

Directions are picked by integer hashing and every float operation of the kernels is
one correctly rounded IEEE operation, so perturbations, updates and replay must match
the CPU's compiled kernels bit for bit. A step's losses come from matmuls, which differ
between devices in their last bits: the step is compared given the same scalar g (the
update depends only on seed, g, lr and decay), its losses to a tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_zo import every_kernel

from fedbits.config import ModelSection
from fedbits.models import load_model
from fedbits.zo.replay import Replay, SeedKeys, rebuild, to_fixed
from fedbits.zo.step import ZeroOrderTrainer

from conftest import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

EXAMPLE = REPO / "examples" / "fedkseed-tiny.toml"


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("start,n", [(0, 100), (13, 1000), (7, 70_001), (1 << 20, 3333)])
def test_kernels_on_cuda_equal_the_cpu(dist, start, n):
    want = every_kernel("cpu", start, n, dist)
    got = every_kernel("cuda", start, n, dist)
    for name, value in want.items():
        assert torch.equal(value, got[name]), name


def _tiny(device: str = "cpu"):
    model, _ = load_model(ModelSection(name="tiny-llama"), seed=0)
    return model.eval().to(device)


def _same(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu())
               for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_replay_on_cuda_equals_the_cpu():
    keys = SeedKeys(list(range(300, 364)))
    pools = [np.random.default_rng(i).normal(size=64) * 30 for i in range(2)]
    results = {}
    for device in ("cpu", "cuda"):
        model = _tiny(device)
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        replay = Replay(model, keys, "gaussian")
        assert all(a.device.type == device for a in replay.acc.values())
        for pool in pools:  # incremental: two syncs
            replay.move_to(to_fixed(pool))
        replay.write(model, base, 1e-3)
        full = _tiny(device)
        rebuild(full, keys, "gaussian", to_fixed(pools[-1]), base, 1e-3, chunk=4093)
        assert _same(model, full)
        results[device] = model
    assert _same(results["cpu"], results["cuda"])


def test_zo_steps_on_cuda_update_as_the_cpu_given_the_same_g():
    cuda, cpu = _tiny("cuda"), _tiny("cpu")
    gen = torch.Generator().manual_seed(0)
    trainer = ZeroOrderTrainer(cuda, eps=1e-3, lr=1e-2, weight_decay=0.1)
    reference = ZeroOrderTrainer(cpu, eps=1e-3, lr=1e-2, weight_decay=0.1)
    with trainer.attached():
        for i in range(3):
            ids = torch.randint(3, 200, (2, 24), generator=gen)  # a CPU batch, as batching makes
            labels = ids.clone()
            labels[:, :10] = -100
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
            loss_plus, loss_minus, g = trainer.step(1000 + i, batch)
            assert g is not None
            with reference.attached():  # the CPU from the same weights, same batch
                cpu_plus, cpu_minus, _ = reference.step(1000 + i, batch)
                reference._owed.clear()  # the CPU's own g is not applied ...
            assert loss_plus == pytest.approx(cpu_plus, abs=1e-4)
            assert loss_minus == pytest.approx(cpu_minus, abs=1e-4)
            reference.apply_step(1000 + i, g)  # ... the CUDA step's g is
    assert _same(cuda, cpu)  # every update, fused into the next step's forward or paid last


def _simulate(run_dir: Path, *overrides: str):
    from fedbits.resolve import load_config
    from fedbits.runtime.setup import prepare_run
    from fedbits.runtime.simulation import Simulation

    cfg = load_config(EXAMPLE, [f"run.out_dir={run_dir}", *overrides])
    (run_dir / "sim").mkdir(parents=True)
    sim = Simulation(prepare_run(cfg), run_dir / "sim")
    sim.run()
    return sim


@pytest.mark.parametrize("overrides", [
    ("method.client_replay=full",),
    ("method.client_replay=incremental",),
    ("model.dtype=bfloat16",),
])
def test_a_fedkseed_run_on_cuda_replays_the_cpu_bits(tmp_path, overrides):
    """Client and server on CUDA agree (no digest refused), and the server's model is the
    CPU's replay of the same published pool, bit for bit."""
    sim = _simulate(tmp_path, "model.device=cuda", "run.rounds=2", *overrides)
    rows = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text()
            .splitlines()]
    assert all(not r["rejected"] for r in rows) and sum(len(r["clients"]) for r in rows) == 6
    server = sim.server
    assert next(server.model.parameters()).device.type == "cuda"
    dtype = "bfloat16" if "model.dtype=bfloat16" in overrides else "float32"
    base_model, _ = load_model(ModelSection(name="tiny-llama", dtype=dtype), seed=0)
    base = {n: p.detach() for n, p in base_model.named_parameters()}
    cpu = _tiny()  # float32 master weights, every one rewritten by the replay
    rebuild(cpu, server.keys, server.opts.distribution, to_fixed(server.published), base,
            server.lr)
    assert _same(server.model, cpu)
