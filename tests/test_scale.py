"""Issue 15: one frozen base per process, devices, low precision, label-only loss.

Everything here runs on the CPU with tiny random models; the same code paths run on
CUDA under the ``gpu`` marker where a GPU exists.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedbits.config import ClientsSection, ModelSection
from fedbits.errors import ConfigError
from fedbits.frozen import FrozenBase, copy_none, own, resolve_device
from fedbits.models import load_model
from fedbits.resolve import load_config
from fedbits.runtime import open_run_dir
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.simulation import Simulation
from fedbits.train import completion_loss, gradient_checkpointing

from conftest import TINY


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _sim(tmp_path, method: str, *extra: str) -> Simulation:
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", "run.name=run", f"method.name={method}",
                             "eval.metrics=['loss']", *extra])
    sim = Simulation(prepare_run(cfg), tmp_path / "run")
    open_run_dir(cfg, False, False)
    return sim


def _base_storages(sim: Simulation) -> set[int]:
    return {_storage(p) for p in sim.setup.frozen.model.parameters()}


@pytest.mark.parametrize("method", ["fedit", "flasc"])
def test_lora_halves_share_one_base_and_never_write_it(tmp_path, method):
    sim = _sim(tmp_path, method, "run.rounds=1")
    base = _base_storages(sim)
    before = {n: p.detach().clone() for n, p in sim.setup.frozen.model.named_parameters()}
    for half in (sim.server.model, sim.client.model):
        frozen = [p for p in half.parameters() if not p.requires_grad]
        assert frozen and all(_storage(p) in base for p in frozen)  # aliased, not copied
        trained = [p for p in half.parameters() if p.requires_grad]
        assert trained and not any(_storage(p) in base for p in trained)
    sim.run()
    for n, p in sim.setup.frozen.model.named_parameters():
        assert torch.equal(before[n], p), f"the shared base changed: {n}"


def test_fedavg_halves_copy_what_they_train(tmp_path):
    sim = _sim(tmp_path, "fedavg", "run.rounds=1")
    base = _base_storages(sim)
    server = {_storage(p) for p in sim.server.model.parameters()}
    client = {_storage(p) for p in sim.client.model.parameters()}
    assert not (server & base) and not (client & base) and not (server & client)


@pytest.mark.parametrize("method", ["partial", "fedcybgd"])
def test_block_methods_copy_only_the_layers_they_train(tmp_path, method):
    sim = _sim(tmp_path, method, "run.rounds=2")
    base = _base_storages(sim)
    before = {n: p.detach().clone() for n, p in sim.setup.frozen.model.named_parameters()}
    shared = {n for n, p in sim.client.model.named_parameters() if _storage(p) in base}
    assert any("embed" in n for n in shared)  # the frozen embedding is not copied
    assert not any(".layers." in n for n in shared) or method == "partial"
    sim.run()
    for n, p in sim.setup.frozen.model.named_parameters():
        assert torch.equal(before[n], p), f"the shared base changed: {n}"


def test_own_keeps_tied_weights_tied_and_promotes_to_float32():
    model, _ = load_model(ModelSection(name="tiny-gpt2", dtype="bfloat16"), seed=0)
    base = FrozenBase(model)
    half = base.build(copy_none)
    own(half, ["transformer.wte.weight"], torch.float32)
    assert half.transformer.wte.weight is half.lm_head.weight  # still tied
    assert half.transformer.wte.weight.dtype == torch.float32
    assert half.transformer.wte.weight.requires_grad
    assert model.transformer.wte.weight.dtype == torch.bfloat16  # the base is untouched
    assert half.transformer.h[0].attn.c_attn.weight is model.transformer.h[0].attn.c_attn.weight


def test_released_base_reads_pretrained_values_back_from_disk(tmp_path):
    model, _ = load_model(ModelSection(name="tiny-llama"), seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = FrozenBase(model, tmp_path / "ckpt")
    half = base.build()  # copies everything: nothing aliases the base
    assert base.release() and base.released
    for name, value in expected.items():
        assert torch.equal(base.tensor(name), value)
    with torch.no_grad():
        next(half.parameters()).add_(1.0)  # the half's copy, not the base
    assert torch.equal(base.tensor(next(iter(expected))), next(iter(expected.values())))


def test_the_last_half_takes_the_base_instead_of_copying_it(tmp_path):
    model, _ = load_model(ModelSection(name="tiny-llama"), seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    storages = {_storage(p) for p in model.parameters()}
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = FrozenBase(model, tmp_path / "ckpt")
    first = base.build()  # another half: a copy
    assert not storages & {_storage(p) for p in first.parameters()}
    last = base.build(take=True)
    assert {_storage(p) for p in last.parameters()} == storages  # no second copy
    assert all(p.requires_grad for p in last.parameters()) and base.released
    with torch.no_grad():
        for p in last.parameters():
            p.add_(1.0)
    for name, value in expected.items():  # the pretrained values come from disk
        assert torch.equal(base.tensor(name), value)
    with pytest.raises(RuntimeError, match="released"):
        base.build()


@pytest.mark.parametrize("method", ["fedavg", "fedkseed"])
def test_in_the_simulator_the_client_takes_a_base_that_is_on_disk(tmp_path, method):
    model, tokenizer = load_model(ModelSection(name="tiny-llama"), seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    weights = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    sim = _sim(tmp_path, method, "run.rounds=2", f"model.name={tmp_path / 'ckpt'}")
    assert sim.setup.frozen.released
    server = {_storage(p) for p in sim.server.model.parameters()}
    assert not server & {_storage(p) for p in sim.client.model.parameters()}
    sim.run()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all('"rejected": {}' in row for row in rows)
    # the taken tensors may be mapped from the file: training them never writes it
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == weights


def test_a_half_that_shares_the_base_does_not_take_it(tmp_path):
    model, _ = load_model(ModelSection(name="tiny-llama"), seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    base = FrozenBase(model, tmp_path / "ckpt")
    base.build(copy_none)
    last = base.build(take=True)
    assert not base.released
    assert not {_storage(p) for p in last.parameters()} & {
        _storage(p) for p in model.parameters()}


def test_a_base_shared_by_a_half_or_without_checkpoint_is_kept(tmp_path):
    model, _ = load_model(ModelSection(name="tiny-llama"), seed=3)
    assert not FrozenBase(model).release()  # no checkpoint on disk: random weights
    model.save_pretrained(tmp_path / "ckpt")
    base = FrozenBase(model, tmp_path / "ckpt")
    base.build(copy_none)
    assert not base.release()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_label_only_loss_equals_the_models_own_loss(name):
    model, tok = load_model(ModelSection(name=name), seed=0)
    model.eval()  # no dropout: both losses see the same network
    ids = torch.randint(3, 200, (3, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, :15] = -100
    labels[2, 20:] = -100
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    own_loss = model(**batch).loss
    ours = completion_loss(model, batch)
    assert torch.allclose(ours, own_loss, rtol=1e-6, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for enabled in (False, True):
        model, _ = load_model(ModelSection(name="tiny-llama"), seed=0)
        model.train()
        gradient_checkpointing(model, enabled)
        ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        completion_loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6), n


def test_gradient_checkpointing_runs_a_round(tmp_path):
    sim = _sim(tmp_path, "fedit", "run.rounds=1", "clients.gradient_checkpointing=true")
    sim.run()
    assert sim.client.model.get_base_model().is_activation_checkpointing


@pytest.mark.parametrize("method", ["fedit", "fedavg", "partial"])
def test_bfloat16_base_trains_float32_master_weights(tmp_path, method):
    sim = _sim(tmp_path, method, "run.rounds=1", "model.dtype=bfloat16")
    trained = [p for p in sim.client.model.parameters() if p.requires_grad]
    frozen = [p for p in sim.client.model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    sim.run()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"rejected": {}' in rows[1]


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:123", "tpu"])
def test_bad_device_names_are_refused(device):
    with pytest.raises(ConfigError, match="model.device"):
        load_config(None, [f"model.device={device}"])


def test_auto_device_is_the_cpu_here_and_cpu_runs(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: auto picks it")
    assert resolve_device("auto") == torch.device("cpu")
    sim = _sim(tmp_path, "fedit", "run.rounds=1", "model.device=cpu")
    assert sim.setup.frozen.device == torch.device("cpu")


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    cfg = load_config(TINY, ["model.device=cuda"])
    with pytest.raises(Exception, match="no CUDA device"):
        prepare_run(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fedit", "flasc", "fedavg", "partial", "fedcybgd"])
def test_a_round_on_cuda_matches_the_cpu(tmp_path, method):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    losses = []
    for device in ("cpu", "cuda"):
        sim = _sim(tmp_path / device, method, "run.rounds=1", f"model.device={device}")
        sim.run()
        row = (tmp_path / device / "run" / "metrics.jsonl").read_text().splitlines()[-1]
        losses.append(json.loads(row)["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_clients_section_defaults_keep_checkpointing_off():
    assert ClientsSection().gradient_checkpointing is False


def test_dense_server_folds_each_change_as_it_is_decoded(tmp_path):
    """A round holds one accumulator, not every client's change; the mean is the same."""
    sim = _sim(tmp_path, "fedavg", "clients.per_round=3")
    server, client = sim.server, sim.client
    setup = sim.setup
    from fedbits.methods import ClientData

    bodies, changes = [], []
    for c in (0, 1, 2):
        items, _ = setup.tokenize(setup.clients[c])
        data = ClientData(items, setup.pad_id, seed=c)
        bodies.append(client.update(1, c, server.downlink(1, c), data, store=None).body)
    for c, body in enumerate(bodies):
        changes.append(server.read_change(1, c, body))
    updates = [server.decode_uplink(1, c, body) for c, body in enumerate(bodies)]
    assert all(u.delta == {} for u in updates)  # the runtime holds no change
    total = sum(u.num_samples for u in changes)
    name = next(iter(server.params))
    expected = sum(u.delta[name] * u.num_samples for u in changes) / total
    got = server.round_sum.means(1, updates)[name]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    for c, body in enumerate(bodies[:2]):
        server.decode_uplink(1, c, body)
    with pytest.raises(RuntimeError, match="other updates"):
        server.aggregate(1, updates)  # three updates, two decoded


def _train_steps(optimizer_kind: str, in_backward: bool) -> dict[str, torch.Tensor]:
    from fedbits.train import StepInBackward, local_train, make_optimizer

    model, _ = load_model(ModelSection(name="tiny-llama"), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = ClientsSection(optimizer=optimizer_kind, lr=1e-2, momentum=0.9, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        ids = torch.randint(3, 200, (2, 16), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    torch.manual_seed(0)
    if in_backward:
        with StepInBackward(params, cfg):
            local_train(model, batches, None)
        assert all(p.grad is None for p in params)  # each freed once it was used
    else:
        local_train(model, batches, make_optimizer(params, cfg))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer_kind", ["adamw", "sgd"])
def test_stepping_in_backward_is_bit_identical_to_one_optimizer(optimizer_kind):
    plain = _train_steps(optimizer_kind, in_backward=False)
    hooked = _train_steps(optimizer_kind, in_backward=True)
    for name, value in plain.items():
        assert torch.equal(value, hooked[name]), name


def test_step_in_backward_removes_its_hooks():
    from fedbits.train import StepInBackward, local_train

    model, _ = load_model(ModelSection(name="tiny-llama"), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    with StepInBackward(params, ClientsSection(lr=1e-2)):
        pass
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    local_train(model, [batch], None)  # no hook left: nothing steps
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("extra", [
    [], ["method.downlink_base=init", "method.downlink=['topk:1/4','int8']"],
    ["method.wire_dtype=bfloat16"],
])
def test_the_change_from_the_downlink_again_equals_the_change_from_a_copy(tmp_path, extra):
    """A dense client rebuilds its start values by decoding the downlink again instead
    of holding a copy through training: the change is the same, bit for bit."""
    from fedbits.methods import ClientData
    from fedbits.methods._updates import train_change

    sim = _sim(tmp_path, "fedavg", *extra)
    server, client, setup = sim.server, sim.client, sim.setup
    items, _ = setup.tokenize(setup.clients[0])
    data = ClientData(items, setup.pad_id, seed=5)
    body = server.downlink(1, 0)
    up = client.update(1, 0, body, data, store=None).body
    got = server.read_change(1, 0, up).delta
    received = client._received(1, 0, body)
    client.fill.receive(client.params, received.tensors)
    copied = train_change(client.model, client.params, data, setup.cfg.clients)
    for name, value in copied.delta.items():
        expected = value.to(got[name].dtype) if extra == ["method.wire_dtype=bfloat16"] else value
        assert torch.equal(got[name], expected), name


def test_an_opened_body_is_a_view_of_the_payload_not_a_copy():
    from fedbits.wire import Direction, Reader, open_envelope, seal

    body = bytes(range(256)) * 64
    payload = seal("fedavg", 3, Direction.UP, body, limit=1 << 20, what="t")
    opened = open_envelope(payload, method="fedavg", round_=3, direction=Direction.UP,
                           limit=1 << 20, what="t")
    assert isinstance(opened, memoryview) and opened.readonly and bytes(opened) == body
    assert opened.obj is payload  # no copy of a model-sized body
    assert Reader(opened).raw(4) == body[:4]


@pytest.mark.parametrize(("method", "setting", "expected"), [
    ("fedavg", "auto", True), ("fedit", "auto", False), ("fedit", "true", True),
    ("fedavg", "false", False),
])
def test_optimizer_in_backward_auto_follows_the_share_that_trains(
    tmp_path, method, setting, expected
):
    from fedbits.methods._updates import _step_in_backward

    sim = _sim(tmp_path, method, f"clients.optimizer_in_backward={setting}")
    params = list(sim.client.params.values())
    assert _step_in_backward(sim.client.model, params, sim.cfg.clients) is expected


def test_optimizer_in_backward_refuses_other_values():
    with pytest.raises(ValueError):
        ClientsSection(optimizer_in_backward="sometimes")
