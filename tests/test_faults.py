"""Fault injection in the simulator ([faults]): each fault strikes at its rate, on a
seed, each attack changes the uplink as documented, and a run with faults completes,
reports them and resumes bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbits.config import ATTACKS, read_config
from fedbits.errors import ClientError, ConfigError, NoUpdateAccepted, WireError
from fedbits.methods import ClientData, get_method
from fedbits.methods.fedkseed import protocol
from fedbits.methods.fedkseed.client import POOL_KEY
from fedbits.methods.injected import CLAIMED_SAMPLES, HUGE, Injected
from fedbits.report import load_run, write_report
from fedbits.resolve import config_toml, load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.faults import FaultPlan, RandomBytes, malicious_clients
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.simulation import Simulation
from fedbits.runtime.store import ClientStores
from fedbits.wire import Reader

from conftest import REPO, TINY, assert_same_final_and_ledger

FEDKSEED = REPO / "examples" / "fedkseed-tiny.toml"
FAST = ["eval.metrics=['loss']", "eval.every=100", "clients.local_steps=2"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- configuration ----------------------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("faults.dropout=1.5", "faults.dropout: Input should be less than or equal to 1"),
    ("faults.crash=-0.1", "faults.crash: Input should be greater than or equal to 0"),
    ("faults.dropout=nan", "faults.dropout: Input should be a finite number"),
    ("faults.straggler_fraction=inf", "faults.straggler_fraction: Input should be a finite"),
    ("faults.malicious_fraction=true", "faults.malicious_fraction: Input should be a valid num"),
    ("faults.dropout='0.3'", "faults.dropout: Input should be a valid number"),
    ("faults.attack='poison'", "faults.attack.0: must be one of 'scale', 'nan', 'huge', "
     "'random_bytes', 'weight' or 'sign_flip', got 'poison'"),
    ("faults.attack=['nan', 7]", "faults.attack.1: must be one of"),
    ("faults.attack=[]", "faults.attack: List should have at least 1 item"),
    ("faults.attack_scale=inf", "faults.attack_scale: Input should be a finite number"),
    ("faults.attack_scale=nan", "faults.attack_scale: Input should be a finite number"),
    ("faults.straggler_delay_s=0", "faults.straggler_delay_s: Input should be greater than 0"),
    ("faults.deadline_s=-1", "faults.deadline_s: Input should be greater than 0"),
    ("faults.deadline_s=5", "faults: deadline_s=5 is below client_seconds=10"),
    ("faults.poison=1", "faults.poison: unknown key (allowed: attack, attack_scale,"),
])
def test_hostile_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        read_config(TINY, [override])
    assert message in str(e.value)


def test_faults_are_simulator_only(tmp_path):
    refusal = r"faults: the \[faults\] section is injected by the simulator only; on " \
        r"runtime.kind = 'flower'"
    with pytest.raises(ConfigError, match=refusal):
        read_config(TINY, ["faults.dropout=0.1", "runtime.kind=flower"])
    from fedbits.runtime.flower.app import write_app  # ships any config as runtime.kind=flower

    with pytest.raises(ConfigError, match=refusal):
        write_app(read_config(TINY, ["faults.dropout=0.1"]), tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_config_without_faults_records_none():
    assert "faults" not in config_toml(load_config(TINY))
    cfg = load_config(TINY, ["faults.attack=nan"])  # one name is a list of one (nan: the name)
    assert cfg.faults is not None and cfg.faults.attack == ["nan"]
    assert "[faults]" in config_toml(cfg)


# -- the plan: rates, seeds, the malicious set ----------------------------------------------
def _plan(*overrides: str) -> FaultPlan:
    return FaultPlan(read_config(TINY, ["data.num_clients=50", "clients.local_steps=4",
                                        *overrides]))


def test_each_fault_strikes_at_its_rate_on_a_seed():
    rates = ("faults.dropout=0.3", "faults.crash=0.2", "faults.straggler_fraction=0.25",
             "faults.straggler_delay_s=30", "faults.deadline_s=40")
    plan = _plan(*rates)
    faults = [plan.plan(r, c) for r in range(1, 41) for c in range(50)]  # 2000 draws
    again = _plan(*rates)  # the same seed draws the same, in any order
    assert faults[::-1] == [again.plan(r, c) for r in range(40, 0, -1) for c in range(49, -1, -1)]
    dropped = sum(f.missing != "" and not f.late for f in faults) / len(faults)
    slow = [f for f in faults if f.seconds is not None]
    crashes = [f.injected.crash_after for f in faults if f.injected.crash_after is not None]
    assert abs(dropped - 0.3) < 0.04
    assert abs(len(slow) / len(faults) - 0.25) < 0.04
    assert abs(len(crashes) / len(faults) - 0.2) < 0.04
    assert set(crashes) == {1, 2, 3, 4}  # after one of the 4 local steps, any of them
    # a slow client takes client_seconds plus an exponential delay of mean 30 s
    delays = [f.seconds - 10 for f in slow if f.seconds is not None]
    assert min(delays) > 0 and abs(np.mean(delays) - 30) < 4
    assert all(f.late == (f.seconds > 40 and "dropped out" not in f.missing) for f in slow)
    assert any(f.late for f in slow)
    other = FaultPlan(read_config(TINY, ["data.num_clients=50", "clients.local_steps=4",
                                         "run.seed=1", "faults.dropout=0.3"]))
    assert [f.missing for f in faults[:200]] != [other.plan(r, c).missing
                                                 for r in range(1, 5) for c in range(50)]


def test_one_rate_does_not_reshuffle_another():
    a = _plan("faults.dropout=0.3")
    b = _plan("faults.dropout=0.3", "faults.crash=0.5", "faults.malicious_fraction=0.2")
    assert [a.plan(r, c).missing for r in range(5) for c in range(50)] == \
        [b.plan(r, c).missing for r in range(5) for c in range(50)]


def test_the_malicious_clients_are_a_fixed_set_and_mix_the_attacks():
    plan = _plan("faults.malicious_fraction=0.1", f"faults.attack={list(ATTACKS)}",
                 "faults.attack_scale=-3")
    assert len(plan.malicious) == 5 and plan.malicious == _plan(
        "faults.malicious_fraction=0.1").malicious
    kinds = {}
    for r in range(1, 31):
        for c in range(50):
            injected = plan.plan(r, c).injected
            assert (injected.attack is not None) == (c in plan.malicious)
            if injected.attack:
                kinds[injected.attack] = kinds.get(injected.attack, 0) + 1
                assert injected.attack_scale == -3
    assert set(kinds) == set(ATTACKS)
    faults = read_config(TINY, ["faults.malicious_fraction=0.01"]).faults
    assert faults is not None
    assert len(malicious_clients(faults, 0, 6)) == 1  # at least one when above 0
    assert malicious_clients(faults, 0, 6) != malicious_clients(faults, 1, 6)  # by run seed


# -- each attack on the wire ---------------------------------------------------------------
@pytest.fixture(scope="module")
def fedavg(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("fedavg")
    cfg = load_config(TINY, [f"run.out_dir={tmp}", "method.name=fedavg", *FAST])
    setup = prepare_run(cfg)
    spec = get_method("fedavg")
    server, client = spec.server(setup.method_context()), spec.client(setup.method_context())
    items, _ = setup.tokenize(setup.clients[0])
    stores = ClientStores(tmp / "store")

    def uplink(injected: Injected) -> bytes:
        data = ClientData(items, setup.pad_id, seed=11, injected=injected)
        half = RandomBytes(client)
        return half.update(1, 0, server.downlink(1, 0), data, stores.for_client(0, 1)).body

    return server, uplink, len(items)


def test_value_attacks_change_the_decoded_change_as_documented(fedavg):
    server, uplink, n = fedavg
    clean = server.read_change(1, 0, uplink(Injected()))
    assert clean.num_samples == n
    for attack, want in [("scale", lambda d: d * 1000.0), ("sign_flip", lambda d: -d),
                         ("huge", lambda d: torch.full_like(d, HUGE))]:
        injected = Injected(attack=attack, attack_scale=1000.0)
        got = server.read_change(1, 0, uplink(injected))
        assert injected.applied == [attack]
        assert got.num_samples == n
        for name, d in clean.delta.items():
            assert torch.equal(got.delta[name], want(d)), (attack, name)
    with pytest.raises(ClientError, match="client 0 uplink: non-finite values in the update"):
        server.read_change(1, 0, uplink(Injected(attack="nan")))


def test_the_weight_attack_claims_the_largest_u32(fedavg):
    server, uplink, _ = fedavg
    got = server.read_change(1, 0, uplink(Injected(attack="weight")))
    assert got.num_samples == CLAIMED_SAMPLES == 2**32 - 1
    clean = server.read_change(1, 0, uplink(Injected()))
    assert all(torch.equal(got.delta[k], clean.delta[k]) for k in clean.delta)


def test_random_bytes_keep_the_length_and_meet_the_decoder(fedavg):
    server, uplink, _ = fedavg
    clean, injected = uplink(Injected()), Injected(attack="random_bytes")
    noise = uplink(injected)
    assert injected.applied == ["random_bytes"]
    assert len(noise) == len(clean) and noise != clean
    assert noise == uplink(Injected(attack="random_bytes"))  # seeded by the data seed
    with pytest.raises((WireError, ClientError)):
        server.read_change(1, 0, noise)


def test_a_crash_raises_after_the_drawn_step(fedavg):
    _, uplink, _ = fedavg
    injected = Injected(crash_after=2)
    with pytest.raises(ClientError, match="crashed after 2 local steps"):
        uplink(injected)
    assert injected.applied == ["crash"]
    uplink(Injected(crash_after=3))  # past the last of the 2 steps: never strikes


@pytest.fixture(scope="module")
def fedkseed(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("fedkseed")
    cfg = load_config(FEDKSEED, [f"run.out_dir={tmp}", "clients.local_steps=3"])
    setup = prepare_run(cfg)
    spec = get_method("fedkseed")
    server, client = spec.server(setup.method_context()), spec.client(setup.method_context())
    items, _ = setup.tokenize(setup.clients[0])
    opts = setup.method_context().options
    stores = ClientStores(tmp / "store")

    def uplink(injected: Injected) -> protocol.SeedUpdate:
        data = ClientData(items, setup.pad_id, seed=5, injected=injected)
        body = client.update(1, 0, server.downlink(1, 0), data, stores.for_client(0, 1)).body
        return protocol.decode_uplink(Reader(body, "uplink"), 0, opts.uplink_format(),
                                      opts.num_seeds, 3)

    return server, uplink


def test_fedkseed_attacks_strike_the_scalars_it_sends(fedkseed):
    server, uplink = fedkseed
    clean = uplink(Injected())
    scaled = uplink(Injected(attack="scale", attack_scale=1024.0))  # a power of two: exact
    flipped = uplink(Injected(attack="sign_flip"))
    huge = uplink(Injected(attack="huge"))
    weight = uplink(Injected(attack="weight"))
    assert np.array_equal(scaled.indices, clean.indices)
    assert np.array_equal(scaled.values, clean.values * 1024)
    assert np.array_equal(flipped.values, -clean.values)
    assert (np.abs(huge.values) >= HUGE * 0.999).all()  # touched entries sum their steps
    assert weight.num_samples == CLAIMED_SAMPLES and np.array_equal(weight.values, clean.values)
    # its own encoder refuses non-finite scalars: a nan attack never leaves the client
    with pytest.raises(ValueError, match="entry values must be finite"):
        uplink(Injected(attack="nan"))


# -- runs -----------------------------------------------------------------------------------
def test_a_mixed_run_completes_records_and_reports_every_fault(tmp_path, one_thread):
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", "run.rounds=4", *FAST,
                             "faults.dropout=0.3", "faults.malicious_fraction=0.1",
                             "faults.attack=['nan', 'random_bytes', 'scale', 'weight']",
                             "faults.crash=0.2", "faults.straggler_fraction=0.3",
                             "faults.deadline_s=40", "run.seed=3"])
    run_dir = run_experiment(cfg)
    rows = _rows(run_dir)[1:]
    assert all("faults" in r for r in rows)
    faults = {k: [(r["round"], c) for r in rows for c in r["faults"][k]]
              for k in ("dropped", "late", "crashed", "attacked")}
    for kind in ("dropped", "late", "crashed"):  # every one of them is a rejection
        for round_, client in faults[kind]:
            assert str(client) in rows[round_ - 1]["rejected"], (kind, round_, client)
            assert str(client) not in rows[round_ - 1]["bytes_up_per_client"]
            assert str(client) in rows[round_ - 1]["bytes_down_per_client"]
    assert faults["dropped"] and faults["attacked"], faults  # seed 3 makes both happen
    report = (run_dir / "report.md").read_text()
    attacked = len(faults["attacked"])
    assert f" {attacked} attacked (" in report and "## Injected faults" in report
    assert "dropped out (injected by faults.dropout)" in report
    run = load_run(run_dir)
    assert len(run.injected_faults()["dropped"]) == len(faults["dropped"])


def test_an_idle_faults_section_changes_nothing(tmp_path, one_thread):
    """Every rate 0: the run is bit for bit the run without [faults]."""
    common = [f"run.out_dir={tmp_path}", "run.rounds=2", *FAST]
    plain = run_experiment(load_config(TINY, [*common, "run.name=plain"]))
    idle = run_experiment(load_config(TINY, [*common, "run.name=idle", "faults.dropout=0"]))
    assert_same_final_and_ledger(plain, idle)
    assert all(r.get("faults", {}).get("dropped", []) == [] for r in _rows(idle))
    assert "[faults]" not in (plain / "config.toml").read_text()


def test_a_crashed_client_leaves_its_store_as_it_was(tmp_path, one_thread):
    """FedKSeed stores the pool it synced to before training: a client that crashes
    after that keeps the pool it had, as if the round had not happened to it."""
    cfg = load_config(FEDKSEED, [f"run.out_dir={tmp_path}", "run.rounds=2", "faults.crash=1",
                                 "clients.local_steps=3", "data.num_clients=3",
                                 "clients.per_round=3"])
    (tmp_path / "sim").mkdir()
    sim = Simulation(prepare_run(cfg), tmp_path / "sim")
    sim.run()
    with pytest.raises(NoUpdateAccepted, match="crashed after"):
        sim.raise_if_nothing_accepted()
    rows = _rows(tmp_path / "sim")
    assert [sorted(r["faults"]["crashed"]) for r in rows[1:]] == [[0, 1, 2], [0, 1, 2]]
    assert all(r.startswith("crashed after") for r in rows[1]["rejected"].values())
    assert all(sim.stores.get(3, c, POOL_KEY) is None for c in range(3))
    assert not (tmp_path / "sim" / "client_store" / "committed").exists()


def test_resume_with_faults_is_bit_exact(tmp_path, one_thread):
    common = [f"run.out_dir={tmp_path}", "clients.local_steps=3", "faults.crash=0.4",
              "faults.dropout=0.2", "faults.malicious_fraction=0.2",
              "faults.attack=['sign_flip', 'random_bytes']"]
    straight = run_experiment(load_config(FEDKSEED, [*common, "run.name=s", "run.rounds=4"]))
    run_experiment(load_config(FEDKSEED, [*common, "run.name=r", "run.rounds=2"]))
    resumed = run_experiment(load_config(FEDKSEED, [*common, "run.name=r", "run.rounds=4"]),
                             resume=True)
    assert_same_final_and_ledger(straight, resumed)
    strip = ("seconds", "train_seconds", "peak_rss_mb", "client_stats", "server_stats")
    want, got = ([{k: v for k, v in r.items() if k not in strip} for r in _rows(d)]
                 for d in (straight, resumed))
    assert want == got
    assert any(r["faults"]["crashed"] for r in want[1:]), "the seed must make a client crash"
    write_report(resumed)
