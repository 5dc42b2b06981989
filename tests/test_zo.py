"""fedbits.zo: the compiled kernels against the torch reference, the step, the replay."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedbits.config import ModelSection
from fedbits.models import load_model
from fedbits.zo import kernels, native
from fedbits.zo.generator import (
    Distribution,
    direction,
    indices,
    param_key,
    table,
    table_ints,
)
from fedbits.zo.replay import Replay, SeedKeys, rebuild, to_fixed
from fedbits.zo.step import ZeroOrderTrainer

RANGES = [(0, 100), (5, 77), (13, 1000), (1 << 20, 3333), (7, 70_001)]


def test_native_kernels_are_built_here():
    # CI machines have a C compiler; a silent fallback would hide a broken build.
    assert native.library() is not None


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("start,n", RANGES)
def test_native_matches_torch_reference(dist, start, n):
    key = param_key(11, "model.layers.0.self_attn.q_proj.weight")
    z = direction(key, start, n, dist)
    assert torch.equal(kernels.fill(key, start, n, dist), z)
    w = torch.randn(n)
    ez = torch.tensor(1e-3) * z
    plus, minus = kernels.perturb_pair(key, start, w, 1e-3, dist)
    assert torch.equal(plus, w + ez) and torch.equal(minus, w - ez)
    updated = w.clone()
    kernels.update_(key, start, updated, 1e-2, 2.5, 0.1, dist)
    f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    assert torch.equal(updated, w - f(1e-2) * (f(2.5) * z + f(0.1) * w))


def test_slices_compose_and_directions_ignore_dtype_and_order():
    key = param_key(3, "w")
    whole = direction(key, 0, 1000, "gaussian")
    parts = torch.cat([kernels.fill(key, a, b - a, "gaussian")
                       for a, b in [(0, 3), (3, 400), (400, 1000)]])
    assert torch.equal(whole, parts)
    # a bfloat16 parameter takes the torch path and gets the same direction values
    w = torch.zeros(1000, dtype=torch.bfloat16)
    plus, _ = kernels.perturb_pair(key, 0, w, 1.0, "gaussian")
    assert torch.equal(plus.float(), whole.to(torch.bfloat16).float())
    # the key depends on (seed, name) only, not on which other parameters exist
    assert param_key(3, "w") != param_key(3, "v") != param_key(4, "w")


def test_gaussian_table_moments():
    t = table("gaussian").double()
    assert t.mean().abs() < 1e-12 and abs(t.pow(2).mean().item() - 1) < 1e-4
    assert set(table_ints("rademacher")) == {-4096, 4096}
    z = direction(param_key(1, "x"), 0, 200_000, "gaussian")
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 0.01


def test_replay_is_exact_and_order_free():
    n = 50_000
    keys = np.array([param_key(s, "w") for s in range(40)], dtype=np.uint64)
    coefs = np.random.default_rng(0).integers(-(1 << 30), 1 << 30, 40)
    ints = torch.tensor(table_ints("gaussian"))
    want = sum(int(c) * ints[indices(int(k), 0, n)] for k, c in zip(keys, coefs, strict=True))
    acc = torch.zeros(n, dtype=torch.int64)
    kernels.replay_(keys, coefs, kernels.exact_groups(coefs, "gaussian"), 0, acc, "gaussian")
    assert torch.equal(acc, want)
    reverse = torch.zeros(n, dtype=torch.int64)
    for k, c in zip(keys[::-1], coefs[::-1], strict=True):  # one seed at a time, other order
        one = np.array([c])
        groups = kernels.exact_groups(one, "gaussian")
        kernels.replay_(np.array([k]), one, groups, 0, reverse, "gaussian")
    assert torch.equal(acc, reverse)


def _tiny(name="tiny-llama"):
    model, _ = load_model(ModelSection(name=name), seed=0)
    return model.eval()


def test_incremental_replay_equals_full_replay():
    model = _tiny()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys = SeedKeys(list(range(100, 132)))
    rng = np.random.default_rng(1)
    pools = [rng.normal(size=32) * 10 for _ in range(3)]
    pools[1][:10] = pools[0][:10]  # some seeds unchanged between syncs
    step = Replay(model, keys, "gaussian")
    for pool in pools:
        step.move_to(to_fixed(pool))
    fresh = Replay(model, keys, "gaussian")
    assert fresh.move_to(to_fixed(pools[-1])) == 32
    for name in step.acc:
        assert torch.equal(step.acc[name], fresh.acc[name])
    step.write(model, base, 1e-3)
    expect = copy.deepcopy(model)
    fresh.write(expect, base, 1e-3)
    assert all(torch.equal(a, b)
               for a, b in zip(model.parameters(), expect.parameters(), strict=True))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_zo_step_losses_and_update_match_explicit_perturbation(name):
    model = _tiny(name)
    ref = copy.deepcopy(model)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 24))
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    eps, lr, wd, seed = 1e-3, 1e-2, 0.1, 12345
    trainer = ZeroOrderTrainer(model, eps=eps, lr=lr, weight_decay=wd)
    with trainer.attached():
        loss_plus, loss_minus, g = trainer.step(seed, batch)
        # inside the step nothing was perturbed in place: only the owed update differs
        assert trainer._owed
        assert all(torch.equal(a, b)
                   for a, b in zip(model.parameters(), ref.parameters(), strict=True))

    def explicit(sign: float) -> float:
        m = copy.deepcopy(ref)
        with torch.no_grad():
            for n, p in m.named_parameters():
                z = direction(param_key(seed, n), 0, p.numel(), "gaussian").view_as(p)
                p.add_(torch.tensor(eps) * z * sign)
            return m(**batch).loss.item()

    assert loss_plus == pytest.approx(explicit(1), abs=1e-5)
    assert loss_minus == pytest.approx(explicit(-1), abs=1e-5)
    assert g == (loss_plus - loss_minus) / (2 * eps)
    f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        for (n, want), got in zip(ref.named_parameters(), model.parameters(), strict=True):
            z = direction(param_key(seed, n), 0, want.numel(), "gaussian").view_as(want)
            decay = wd if want.ndim >= 2 else 0.0
            assert torch.equal(got, want - f(lr) * (f(g) * z + f(decay) * want)), n


def test_non_finite_loss_skips_the_step():
    model = _tiny()
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 200, (1, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.full_like(ids, -100)}  # no target: the loss is NaN
    trainer = ZeroOrderTrainer(model, eps=1e-3, lr=1.0)
    with trainer.attached():
        assert trainer.step(1, batch)[2] is None
    assert all(torch.equal(a, b)
               for a, b in zip(model.parameters(), ref.parameters(), strict=True))


# ------------------------------------------------ the torch reference path, bit for bit
@pytest.fixture
def reference_path(monkeypatch):
    """Force the torch reference path (what non-CPU devices and other dtypes take) on
    the CPU, where it can be compared with the compiled kernels."""
    def force() -> None:
        monkeypatch.setattr(native, "usable", lambda *tensors: False)
    return force


def every_kernel(device: str, start: int, n: int, dist: Distribution) -> dict[str, torch.Tensor]:
    """Every primitive on fixed inputs made on the CPU and moved to ``device``; outputs
    come back to the CPU."""
    key = param_key(5, "model.layers.1.mlp.up_proj.weight")
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=gen).to(device)
    out = {"fill": kernels.fill(key, start, n, dist, device)}
    out["plus"], out["minus"] = kernels.perturb_pair(key, start, w, 1e-3, dist)
    updated = w.clone()
    kernels.update_(key, start, updated, 1e-2, -3.7, 0.1, dist)
    out["update"] = updated
    fused = w.clone()
    plus, minus = kernels.update_perturb(key, 1e-2, 2.5, 0.1, key ^ 1, 1e-3, start, fused, dist)
    out.update(fused=fused, fused_plus=plus, fused_minus=minus)
    keys = np.array([param_key(s, "w") for s in range(9)], dtype=np.uint64)
    coefs = np.random.default_rng(n).integers(-(1 << 30), 1 << 30, 9)
    acc = torch.randint(-(1 << 40), 1 << 40, (n,), generator=gen).to(device)
    kernels.replay_(keys, coefs, kernels.exact_groups(coefs, dist), start, acc, dist)
    out["replay"] = acc
    applied = torch.empty(n, device=device)
    kernels.apply(w, acc, 3e-7 / 2**28, applied)
    out["apply"] = applied
    out["rows_plus"], out["rows_minus"] = kernels.perturb_rows(
        key, torch.randn(8, 33, generator=gen).to(device), torch.tensor([3, 0, 7]), 1e-3, dist)
    for name, value in out.items():
        assert value.device.type == torch.device(device).type, name
    return {name: value.cpu() for name, value in out.items()}


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("start,n", RANGES)
def test_reference_path_is_bit_identical_to_the_compiled_kernels(dist, start, n, reference_path):
    want = every_kernel("cpu", start, n, dist)
    reference_path()
    got = every_kernel("cpu", start, n, dist)
    for name, value in want.items():
        assert value.dtype == got[name].dtype and torch.equal(value, got[name]), name


def test_reference_replay_blocks_compose(monkeypatch, reference_path):
    """The reference replay splits (seeds × elements) into blocks; any split is exact."""
    reference_path()
    n = 10_000
    keys = np.array([param_key(s, "w") for s in range(30)], dtype=np.uint64)
    coefs = np.random.default_rng(2).integers(-(1 << 30), 1 << 30, 30)
    ends = kernels.exact_groups(coefs, "gaussian")
    whole = torch.zeros(n, dtype=torch.int64)
    kernels.replay_(keys, coefs, ends, 0, whole, "gaussian")
    monkeypatch.setattr(kernels, "REFERENCE_BLOCK", 777)  # blocks of 777 elements, 1 seed
    split = torch.zeros(n, dtype=torch.int64)
    kernels.replay_(keys, coefs, ends, 0, split, "gaussian")
    assert torch.equal(whole, split)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (2, 24), generator=gen)
    labels = ids.clone()
    labels[:, :10] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _train(model, steps: int = 3) -> list[tuple[float, float, float | None]]:
    trainer = ZeroOrderTrainer(model, eps=1e-3, lr=1e-2, weight_decay=0.1)
    with trainer.attached():
        return [trainer.step(100 + i, _batch(i)) for i in range(steps)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_zo_step_on_the_reference_path_is_bit_identical(name, reference_path):
    native_model, reference_model = _tiny(name), _tiny(name)
    want = _train(native_model)
    reference_path()
    assert _train(reference_model) == want  # same losses, hence the same g
    assert all(torch.equal(a, b) for a, b in
               zip(native_model.parameters(), reference_model.parameters(), strict=True))


def test_apply_step_is_what_a_step_leaves():
    model, again = _tiny(), _tiny()
    (_, _, g), = _train(model, steps=1)
    assert g is not None
    ZeroOrderTrainer(again, eps=1e-3, lr=1e-2, weight_decay=0.1).apply_step(100, g)
    assert all(torch.equal(a, b)
               for a, b in zip(model.parameters(), again.parameters(), strict=True))


@pytest.mark.parametrize("path", ["native", "reference"])
def test_chunked_full_replay_equals_the_accumulator_replay(path, reference_path):
    """client_replay = "full" (no accumulator kept, chunks of U) against the accumulator
    replay the server and incremental clients use: the same bits, on either path."""
    if path == "reference":
        reference_path()
    model = _tiny()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys = SeedKeys(list(range(200, 248)))
    pool = np.random.default_rng(3).normal(size=48) * 20
    pool[::5] = 0.0  # seeds a pool has not used yet
    fix = to_fixed(pool)
    replay = Replay(model, keys, "gaussian")
    replay.move_to(fix)
    replay.write(model, base, 1e-3)
    want = [p.detach().clone() for p in model.parameters()]
    for chunk in (1000, 4093, 1 << 20):  # not multiples of 16: directions split mid-group
        rebuilt = _tiny()
        with torch.no_grad():
            for p in rebuilt.parameters():
                p.fill_(7.0)  # whatever the weights were, the rebuild replaces them
        assert rebuild(rebuilt, keys, "gaussian", fix, base.__getitem__, 1e-3, chunk) == 38
        assert all(torch.equal(a, b) for a, b in zip(want, rebuilt.parameters(), strict=True))


def test_replay_from_a_bfloat16_base_equals_its_float32_values():
    """w0 may be the low-precision frozen base: it converts to float32 exactly."""
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    low = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    wide = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys, fix = SeedKeys([1, 2, 3]), to_fixed(np.array([4.0, -2.5, 9.0]))
    rebuild(model, keys, "gaussian", fix, low, 1e-3)
    want = _tiny()
    rebuild(want, keys, "gaussian", fix, wide, 1e-3)
    assert all(torch.equal(a, b)
               for a, b in zip(model.parameters(), want.parameters(), strict=True))
