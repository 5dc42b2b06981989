"""FedKSeed / FedKSeed-Pro end to end on the tiny model: exact replay, bytes, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbits.methods.fedkseed.client import POOL_KEY, FedKSeedClient
from fedbits.methods.fedkseed.wire import EntryFormat, encode_entries
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.simulation import Simulation
from fedbits.wire import Writer, header_size

from conftest import REPO

EXAMPLE = REPO / "examples" / "fedkseed-tiny.toml"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _simulate(tmp_path: Path, *overrides: str, rounds: int = 4) -> Simulation:
    cfg = load_config(EXAMPLE, [f"run.out_dir={tmp_path}", f"run.rounds={rounds}", *overrides])
    (tmp_path / "sim").mkdir(parents=True)
    sim = Simulation(prepare_run(cfg), tmp_path / "sim")
    sim.run()
    return sim


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_client_replay_is_bit_identical_to_the_server(tmp_path, mode):
    sim = _simulate(tmp_path, f"method.client_replay={mode}")
    rows = _rows(tmp_path / "sim")
    # every uplink carried the digest of the client's replayed model; the server
    # refuses any update whose model differs from its own, so none may be rejected
    assert all(not r["rejected"] for r in rows)
    assert sum(len(r["clients"]) for r in rows) == 12
    assert any(s["replay_seeds"] > 0 for r in rows[2:] for s in r["client_stats"].values())
    # a fresh client process (no cache) rebuilds the final model from w0 + the pool
    client = FedKSeedClient(sim.setup.method_context())
    assert client.sync(sim.server.published) == np.count_nonzero(sim.server.published)
    pairs = zip(sim.server.model.named_parameters(), client.model.parameters(), strict=True)
    for (name, want), got in pairs:
        assert torch.equal(want, got), name
    base = sim.setup.frozen.model.state_dict()
    assert any(not torch.equal(base[n], p) for n, p in sim.server.model.named_parameters())


def test_a_client_whose_replay_diverges_is_refused_then_resynced(tmp_path):
    cfg = load_config(EXAMPLE, [f"run.out_dir={tmp_path}", "run.rounds=4", "clients.per_round=6",
                                  "method.num_seeds=4096"])
    (tmp_path / "sim").mkdir()
    sim = Simulation(prepare_run(cfg), tmp_path / "sim")
    for round_ in (1, 2):
        sim.run_round(round_)
        sim._checkpoint(round_)
    store = sim.stores.for_client(0, 3)
    pool = np.frombuffer(store.get(POOL_KEY), dtype="<f8").copy()
    untouched = np.nonzero((pool == 0) & (sim.server.pool == 0))[0][0]
    pool[untouched] = 1.0  # the node's cached pool got corrupted where nothing will be resent
    store.put(POOL_KEY, pool.tobytes())
    row = sim.run_round(3)
    assert "differs from the server's" in row["rejected"]["0"]
    assert len(row["clients"]) - len(row["rejected"]) == 5
    sim._checkpoint(3)
    row = sim.run_round(4)  # the server forgot client 0's view: it gets the whole pool
    assert not row["rejected"]


def test_uplink_and_downlink_bytes_follow_the_wire_format(tmp_path):
    _simulate(tmp_path, "method.zstd=false", rounds=2)
    lines = (tmp_path / "sim" / "ledger.jsonl").read_text().splitlines()
    ledger = [json.loads(line) for line in lines]
    header = header_size("fedkseed")
    tau, k = 20, 64
    fmt = EntryFormat("compact", "float16", zstd=False)
    steps = Writer()
    encode_entries(steps, np.zeros(tau, dtype=np.int64), np.ones(tau), k, fmt, unique=False)
    most_up = header + 4 + 4 + 4 + 1 + len(steps.getvalue())  # the steps list is an upper bound
    ups = [r["bytes"] for r in ledger if r["direction"] == "up"]
    assert ups and all(header + 14 <= b <= most_up for b in ups)
    downs = {r["round"]: r["bytes"] for r in ledger if r["direction"] == "down"}
    assert downs[1] == header + 1 + 1 + 4 + 1  # full flag, empty list: tag, count, fp16 exponent
    dense = header + 1 + 1 + 1 + 2 * k  # flag, tag, float16 exponent, K values
    assert all(b <= dense for r, b in downs.items())


def test_fedkseed_resume_is_bit_identical(tmp_path):
    common = [f"run.out_dir={tmp_path}", "eval.every=100"]
    whole = run_experiment(load_config(EXAMPLE, common + ["run.name=whole", "run.rounds=4"]))
    part = load_config(EXAMPLE, common + ["run.name=part", "run.rounds=2"])
    run_experiment(part)
    resumed = run_experiment(load_config(EXAMPLE, common + ["run.name=part", "run.rounds=4"]),
                             resume=True)
    from safetensors.torch import load_file

    want = load_file(whole / "final" / "model.safetensors")
    got = load_file(resumed / "final" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (whole / "ledger.jsonl").read_text() == (resumed / "ledger.jsonl").read_text()
    assert all(not r["rejected"] for r in _rows(resumed))


def test_pro_sends_importance_and_samples_by_it(tmp_path):
    sim = _simulate(tmp_path, "method.name=fedkseed-pro", rounds=3)
    rows = _rows(tmp_path / "sim")
    assert all(not r["rejected"] for r in rows)
    assert sim.server.history_count.sum() > 0
    levels = sim.server.importance_levels()
    assert levels.min() == 0 and levels.max() == 255
    plain = _simulate(tmp_path / "plain", rounds=3)
    plain_down = sum(r["bytes_down"] for r in _rows(tmp_path / "plain" / "sim"))
    assert sum(r["bytes_down"] for r in rows) > plain_down
    assert plain.server.history_count.sum() == 0


def _saved_tiny(path: Path) -> Path:
    """tiny-llama as a save_pretrained directory: a base the runtime can release and
    read back from disk, as it does for a real checkpoint."""
    from fedbits.config import ModelSection
    from fedbits.models import load_model

    model, tok = load_model(ModelSection(name="tiny-llama"), seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_replay_reads_the_released_base_from_disk(tmp_path, mode):
    """Server and client both train every weight, so the runtime drops the frozen base
    after building them: replay then reads w0 back from the checkpoint, a tensor at a
    time, and client and server still agree bit for bit."""
    model_dir = _saved_tiny(tmp_path / "tiny")
    sim = _simulate(tmp_path / "run", f"model.name={model_dir}",
                    f"method.client_replay={mode}", rounds=3)
    assert sim.setup.frozen.released
    rows = _rows(tmp_path / "run" / "sim")
    assert all(not r["rejected"] for r in rows) and sum(len(r["clients"]) for r in rows) == 9
    client = sim.client
    assert isinstance(client, FedKSeedClient)
    client.sync(sim.server.published)
    pairs = zip(sim.server.model.named_parameters(), client.model.parameters(), strict=True)
    for (name, want), got in pairs:
        assert torch.equal(want, got), name
    assert not hasattr(client, "base") and not hasattr(sim.server, "base")  # no w0 clone


def test_a_bfloat16_model_trains_float32_master_weights(tmp_path):
    """model.dtype = bfloat16: each half gets float32 master copies of the bfloat16 base;
    the step perturbs float32 weights, replay starts from the bfloat16 values."""
    sim = _simulate(tmp_path, "model.dtype=bfloat16", rounds=2)
    rows = _rows(tmp_path / "sim")
    assert all(not r["rejected"] for r in rows) and sum(len(r["clients"]) for r in rows) == 6
    assert all(np.isfinite(r["train_loss"]) for r in rows if r["round"] > 0)
    assert all(p.dtype == torch.float32 for p in sim.server.model.parameters())
    assert all(p.dtype == torch.float32 for p in sim.client.model.parameters())
    base = sim.setup.frozen.model
    assert all(p.dtype == torch.bfloat16 for p in base.parameters())
    moved = [n for n, p in sim.server.model.named_parameters()
             if not torch.equal(p, base.get_parameter(n).float())]
    assert moved


def test_the_server_forgets_the_oldest_views_beyond_max_views(tmp_path):
    """Server memory stays flat in the number of clients: beyond ``max_views`` the client
    seen longest ago is forgotten and gets the whole pool next time (still in sync)."""
    from fedbits.methods.fedkseed import protocol
    from fedbits.wire import Reader

    sim = _simulate(tmp_path, "method.max_views=1", "clients.per_round=2", rounds=3)
    server = sim.server
    assert len(server.views) == 1
    remembered = next(iter(server.views))
    forgotten = next(c for c in sim.setup.eligible_clients() if c != remembered)
    opts = server.opts
    full = protocol.decode_downlink(Reader(server.downlink(4, forgotten)), opts.pool_format(),
                                    opts.num_seeds, False)[0]
    assert full
    assert all(not row["rejected"] for row in _rows(tmp_path / "sim"))


def _minimal_config(tmp_path: Path, clients: str,
                    method: str = 'name = "fedkseed"\nnum_seeds = 16') -> Path:
    """A run that leaves the ``[clients]`` keys it does not name unset."""
    path = tmp_path / "minimal.toml"
    path.write_text(f'[run]\nname = "defaults"\nrounds = 1\nout_dir = "{tmp_path}"\n'
                    '[model]\nname = "tiny-llama"\n'
                    '[data]\nbuiltin_per_task = 4\nnum_clients = 2\n'
                    f'[clients]\nper_round = 2\nmax_length = 32\n{clients}\n'
                    f'[method]\n{method}\n'
                    '[eval]\nmetrics = ["loss"]\nmax_examples = 2\n')
    return path


def test_the_paper_client_setting_is_the_default_and_an_explicit_value_wins(tmp_path):
    import tomllib

    from fedbits.config import read_config
    from fedbits.resolve import apply_client_defaults, config_toml

    path = _minimal_config(tmp_path, "local_steps = 2")
    run_dir = run_experiment(load_config(path))
    saved = tomllib.loads((run_dir / "config.toml").read_text())["clients"]
    # lr and batch_size were not set: the paper's; local_steps was: the user's
    assert (saved["lr"], saved["batch_size"], saved["local_steps"]) == (3e-7, 1, 2)
    assert all(not r["rejected"] and r["clients"] for r in _rows(run_dir)[1:])
    explicit = load_config(path, ["clients.lr=0.001", "clients.batch_size=2"])
    assert (explicit.clients.lr, explicit.clients.batch_size) == (1e-3, 2)
    # what a Flower run ships to its nodes is the same resolved text
    assert tomllib.loads(config_toml(load_config(path)))["clients"]["lr"] == 3e-7
    # a method that declares nothing keeps the generic defaults
    other = read_config(_minimal_config(tmp_path, "", 'name = "fedavg"'))
    apply_client_defaults(other)
    assert other.clients.lr == 1e-4 and other.clients.batch_size == 4


def test_methods_v_shows_the_declared_client_defaults(capsys):
    from fedbits.cli import main

    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("\nfedkseed "):out.index("\nfedkseed-pro ")]
    assert "[clients] lr = 3e-07" in section and "[clients] local_steps = 200" in section
    assert "[clients] batch_size = 1" in section


def test_weight_decay_is_refused_with_the_reason(tmp_path):
    from fedbits.errors import ConfigError

    with pytest.raises(ConfigError, match="clients.weight_decay = 0.1: fedkseed's model is the "
                       "base weights plus the seed pool's steps"):
        load_config(EXAMPLE, [f"run.out_dir={tmp_path}", "clients.weight_decay=0.1"])


def test_pro_importance_counts_each_seeds_initial_zero():
    """The reference starts every seed's history with a 0 (``--grad_initial``): a seed
    seen once with |scalar| 10 has mean 5, one seen four times with 10 has mean 8."""
    from types import SimpleNamespace

    from fedbits.methods.fedkseed.server import FedKSeedServer

    history = SimpleNamespace(history_sum=np.array([10.0, 40.0, 0.0]),
                              history_count=np.array([1, 4, 0]))
    levels = FedKSeedServer.importance_levels(history)  # type: ignore[arg-type]
    assert levels.tolist() == [round(5 / 8 * 255), 255, 0]


def test_grad_clip_skips_a_step_on_the_client_and_in_replay(tmp_path):
    """A step whose loss gap exceeds method.grad_clip sends no scalar: the server's replay
    (which every client's digest must match) skips it too, so nothing is refused."""
    sim = _simulate(tmp_path, "method.grad_clip=0.004", rounds=2)
    rows = _rows(tmp_path / "sim")
    skipped = [s["skipped_steps"] for r in rows[1:] for s in r["client_stats"].values()]
    assert all(not r["rejected"] for r in rows) and sum(len(r["clients"]) for r in rows) == 6
    assert 0 < sum(skipped) < 6 * 20, skipped
    client = FedKSeedClient(sim.setup.method_context())
    client.sync(sim.server.published)
    assert all(torch.equal(a, b) for a, b in
               zip(sim.server.model.parameters(), client.model.parameters(), strict=True))


def test_a_clipped_step_leaves_the_weights_alone():
    from test_zo import _batch, _tiny

    from fedbits.zo.step import ZeroOrderTrainer

    model, before = _tiny(), _tiny()
    trainer = ZeroOrderTrainer(model, eps=1e-3, lr=1e-2, loss_gap_clip=1e-12)
    with trainer.attached():
        loss_plus, loss_minus, g = trainer.step(100, _batch(0))
    assert g is None and loss_plus != loss_minus
    assert all(torch.equal(a, b) for a, b in
               zip(model.parameters(), before.parameters(), strict=True))
