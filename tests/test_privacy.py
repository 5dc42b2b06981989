"""Client-level differential privacy (``[privacy]``, fedbits.privacy, docs/privacy.md):
clipping, the seeded noise on the fixed-denominator mean, the accountant, the config's
refusals, and whole runs (inert = plain bit for bit, ε per round, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from fedbits.config import read_config
from fedbits.errors import ConfigError
from fedbits.privacy import Accountant, ClientLevelDP, add_noise_, clip_
from fedbits.resolve import load_config
from fedbits.robust import update_norm
from fedbits.runtime import run_experiment

from conftest import TINY, assert_same_final_and_ledger

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
DP = ["privacy.clip_norm=0.05", "privacy.noise_multiplier=0.5", "privacy.noise_seed=run"]
"""Reproducible noise, so that runs can be compared (the default key is secret)."""
INERT = ["privacy.clip_norm=off", "privacy.noise_multiplier=0.0"]
THREE = ["method.name=fedavg", "data.num_clients=3", "data.partition=iid",
         "clients.per_round=3", "eval.metrics=['loss']", "eval.every=100"]
"""FedAvg with three clients, all sampled every round (q = 1)."""


def _section(*overrides: str):
    return read_config(TINY, [*DP, *overrides]).privacy


# ---------------------------------------------------------------------- the maths


def test_clipping_bounds_the_whole_update_and_leaves_small_ones_alone():
    big = [torch.full((3, 4), 2.0), torch.full((5,), -1.0)]
    assert clip_(big, 0.5)
    assert update_norm(big) <= 0.5 * (1 + 1e-6)
    assert update_norm(big) == pytest.approx(0.5, rel=1e-6)
    small = [torch.tensor([0.1, -0.2])]
    assert not clip_(small, 1.0)
    assert torch.equal(small[0], torch.tensor([0.1, -0.2]))
    huge = [torch.full((1000,), 3e38)]  # its squares overflow float32: clipped, not inf
    assert clip_(huge, 1.0) and update_norm(huge) == pytest.approx(1.0, rel=1e-5)


def test_noise_is_seeded_sliced_and_of_the_stated_size(monkeypatch):
    monkeypatch.setattr("fedbits.privacy.CHUNK", 1000)  # many slices
    draws = []
    for seed in (1, 1, 2):
        t = torch.zeros(50_000)
        add_noise_(t, 0.3, torch.Generator().manual_seed(seed))
        draws.append(t)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert draws[0].std().item() == pytest.approx(0.3, rel=0.02)
    assert draws[0].mean().item() == pytest.approx(0.0, abs=0.01)


def test_release_noises_the_fixed_denominator_mean_per_round_and_seed():
    like = {"a": torch.zeros(40_000), "b": torch.zeros(10)}

    def release(seed: int, round_: int, received: int, noise: float) -> dict[str, torch.Tensor]:
        dp = ClientLevelDP(0.5, noise, seed, CPU)
        changes = {"a": torch.full((40_000,), 0.1)}  # the mean of `received` clipped updates
        stats = dp.release_(round_, changes, {"a": received}, {"a": 4, "b": 4}, like)
        assert stats == {}  # nothing was clipped through this object
        return changes

    exact = release(0, 1, 2, 0.0)  # two of four answered: sum 0.2, divided by the cohort
    assert torch.allclose(exact["a"], torch.full((40_000,), 0.05))
    assert torch.equal(exact["b"], torch.zeros(10))  # scheduled, none sent it: noise only
    noised = release(0, 1, 4, 2.0)
    assert torch.equal(noised["a"], release(0, 1, 4, 2.0)["a"])  # one seed, one draw
    assert not torch.equal(noised["a"], release(1, 1, 4, 2.0)["a"])  # another seed
    assert not torch.equal(noised["a"], release(0, 2, 4, 2.0)["a"])  # another round
    # σ = z·C on the sum, z·C / cohort on the mean
    assert (noised["a"] - 0.1).std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert noised["b"].abs().max() > 0


def test_clipped_updates_are_counted_per_round():
    dp = ClientLevelDP(1.0, 0.0, 0, CPU)
    dp.clip(1, {"w": torch.full((4,), 3.0)})
    dp.clip(1, {"w": torch.full((4,), 0.1)})
    assert update_norm([torch.full((4,), 3.0)]) > 1.0
    assert dp.release_(1, {"w": torch.zeros(4)}, {"w": 2}, {"w": 2},
                       {"w": torch.zeros(4)}) == {"dp_clipped": 1}
    dp.clip(2, {"w": torch.full((4,), 0.1)})  # a new round starts counting afresh
    assert dp.release_(2, {"w": torch.zeros(4)}, {"w": 1}, {"w": 1},
                       {"w": torch.zeros(4)}) == {}


@pytest.mark.parametrize("cohort, population, noise", [(3, 3, 0.5), (3, 50, 1.1), (10, 1000, 0.8)])
def test_epsilon_is_opacus_rdp_accountant_after_as_many_rounds(cohort, population, noise):
    cfg = _section(f"privacy.noise_multiplier={noise}", "data.num_clients=1000")
    accountant = Accountant(cfg, cohort, population)
    direct = RDPAccountant()
    eps = [accountant.epsilon(0)]
    for rounds in range(1, 6):
        direct.step(noise_multiplier=noise, sample_rate=cohort / population)
        eps.append(accountant.epsilon(rounds))
        assert eps[-1] == pytest.approx(direct.get_epsilon(cfg.delta), rel=1e-12)
    assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert accountant.row(5) == {"dp_epsilon": eps[-1], "dp_delta": 1e-5}


def test_without_noise_there_is_no_finite_epsilon():
    accountant = Accountant(_section("privacy.noise_multiplier=0"), 3, 3)
    assert accountant.epsilon(0) == 0.0 and accountant.epsilon(4) is None


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    (["privacy.noise_multiplier=-1"], r"privacy\.noise_multiplier: Input should be greater"),
    (["privacy.noise_multiplier=nan"], r"privacy\.noise_multiplier: Input should be a finite"),
    (["privacy.noise_multiplier=inf"], r"privacy\.noise_multiplier: Input should be a finite"),
    (["privacy.noise_multiplier='1'"], r"privacy\.noise_multiplier: Input should be a valid"),
    (["privacy.noise_multiplier=true"], r"privacy\.noise_multiplier: Input should be a valid"),
    (["privacy.clip_norm=0"], r"privacy\.clip_norm: must be 'off' or a positive number"),
    (["privacy.clip_norm=-2"], r"privacy\.clip_norm: must be 'off' or a positive number"),
    (["privacy.clip_norm=nan"], r"privacy\.clip_norm: must be 'off' or a positive number"),
    (["privacy.clip_norm=inf"], r"privacy\.clip_norm: must be 'off' or a positive number"),
    (["privacy.clip_norm=auto"], r"privacy\.clip_norm: must be 'off' or a positive number"),
    (["privacy.clip_norm=off"],
     r"privacy: noise_multiplier=0\.5 with clip_norm = 'off': an unclipped update has no bound"),
    (["privacy.delta=0"], r"privacy\.delta: Input should be greater than 0"),
    (["privacy.delta=1.0"], r"privacy\.delta: Input should be less than 1"),
    (["privacy.delta=0.2"], r"privacy\.delta=0\.2 is not below 1 / data\.num_clients = 0\.167"),
    (["privacy.accountant=gdp"], r"privacy\.accountant: must be one of 'rdp', got 'gdp'"),
    (["privacy.noise_seed=random"],
     r"privacy\.noise_seed: must be one of 'run' or 'secret', got 'random'"),
    (["privacy.epsilon=3"], r"privacy\.epsilon: unknown key \(allowed: accountant, clip_norm"),
    (["robust.aggregator=median"],
     r"robust\.aggregator = 'median' with \[privacy\]: .*use robust\.aggregator = 'mean'"),
    (["robust.server_weighting=samples"],
     r"robust\.server_weighting = 'samples' with \[privacy\]: .* needs robust\.server_weighting"
     r" = 'uniform'"),
    (["robust.norm_bound=auto"], r"robust\.norm_bound = 'auto' with \[privacy\]"),
    (["method.name=fedkseed"],
     r"\[privacy\] is not supported by method\.name = 'fedkseed': an update is τ zeroth-order"),
    (["method.name=fedcybgd"],
     r"\[privacy\] is not supported by method\.name = 'fedcybgd': a block takes the change of"),
])
def test_bad_privacy_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [*DP, *overrides])


def test_only_the_methods_that_apply_it_accept_privacy():
    """An options class accepts [privacy] only where it says so itself: CG-FedLLM builds on
    FedIT's options, but its server also trains an autoencoder on the clients' updates
    and sends it to clients."""
    from fedbits.methods import available_methods, get_method

    builtin = {"fedavg", "fedit", "flasc", "partial", "fedcybgd", "fedkseed", "fedkseed-pro",
               "cgfedllm"}  # other tests register methods of their own
    assert builtin <= set(available_methods())
    accepting = {name for name in builtin if get_method(name).options.privacy_refused() is None}
    assert accepting == {"fedavg", "fedit", "flasc", "partial"}
    assert "zeroth-order" in get_method("fedkseed-pro").options.privacy_refused()


def test_a_missing_setting_is_an_error_not_a_default():
    with pytest.raises(ConfigError, match=r"privacy\.noise_multiplier: Field required"):
        load_config(TINY, ["privacy.clip_norm=1"])


def test_privacy_sets_the_robust_keys_it_needs_where_they_are_unset():
    cfg = load_config(TINY, DP)
    assert (cfg.robust.server_weighting, cfg.robust.norm_bound) == ("uniform", "off")
    explicit = load_config(TINY, [*DP, "robust.server_weighting=uniform",
                                  "robust.norm_bound=off"])
    assert explicit.robust == cfg.robust
    inert = load_config(TINY, INERT)  # changes nothing: the [robust] defaults stay
    assert (inert.robust.server_weighting, inert.robust.norm_bound) == ("samples", "auto")
    for method in ("fedit", "flasc", "fedavg", "partial"):
        assert load_config(TINY, [*DP, f"method.name={method}"]).privacy is not None


# ---------------------------------------------------------------------- runs


def _run(out: Path, name: str, *overrides: str, rounds: int = 3, resume: bool = False) -> Path:
    cfg = load_config(TINY, [f"run.out_dir={out}", f"run.name={name}", f"run.rounds={rounds}",
                             *THREE, *overrides])
    return run_experiment(cfg, resume=resume)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run_dir / "final").glob("*.safetensors")))


TIMES = {"seconds", "train_seconds", "peak_rss_mb"}


def _without(rows: list[dict], keys: set[str]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in keys} for row in rows]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("dp"), "dp", *DP)


def test_an_inert_privacy_section_is_the_plain_run_bit_for_bit(tmp_path):
    plain, inert = _run(tmp_path, "plain", rounds=2), _run(tmp_path, "inert", *INERT, rounds=2)
    assert_same_final_and_ledger(plain, inert)
    rows = _rows(inert)
    assert [r["dp_epsilon"] for r in rows] == [0.0, None, None]  # no noise: no guarantee
    assert _without(rows, TIMES | {"dp_epsilon", "dp_delta"}) == _without(_rows(plain), TIMES)


def test_a_dp_run_reports_epsilon_every_round_from_the_accountant(dp_run):
    rows = _rows(dp_run)
    eps = [r["dp_epsilon"] for r in rows]
    accountant = Accountant(_section(), 3, 3)
    assert eps == [accountant.epsilon(t) for t in range(4)]
    assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert all(r["dp_delta"] == 1e-5 for r in rows)
    # clip_norm 0.05 is below a tiny FedAvg client's change: each one is clipped
    assert all(r["server_stats"] == {"dp_clipped": 3} for r in rows[1:])
    final = _final(dp_run)
    assert all(t.isfinite().all() for t in final.values())


def test_noise_changes_the_model_and_the_seed_changes_the_noise(tmp_path):
    quiet = _final(_run(tmp_path, "quiet", *DP[:1], "privacy.noise_multiplier=0", rounds=1))
    noised = _final(_run(tmp_path, "noised", *DP, rounds=1))
    other = _final(_run(tmp_path, "other", *DP, "run.seed=1", rounds=1))
    assert any(not torch.equal(quiet[k], noised[k]) for k in quiet)
    assert any(not torch.equal(noised[k], other[k]) for k in noised)


def test_a_resumed_dp_run_is_the_uninterrupted_one(tmp_path, dp_run):
    """Also one seed reproducing a noised run: the part is a process of its own."""
    _run(tmp_path, "dp", *DP, rounds=2)
    resumed = _run(tmp_path, "dp", *DP, rounds=3, resume=True)
    assert_same_final_and_ledger(dp_run, resumed)
    got, want = _rows(resumed), _rows(dp_run)  # the part evaluated its last round, 2, too
    for key in ("dp_epsilon", "dp_delta", "server_stats", "train_loss"):
        assert [r.get(key) for r in got] == [r.get(key) for r in want]
    assert _without(got[-1:], TIMES) == _without(want[-1:], TIMES)


@pytest.mark.parametrize("method", ["fedit", "flasc", "partial"])
def test_each_private_method_clips_noises_and_reports(tmp_path, method):
    run = _run(tmp_path, method, f"method.name={method}", "privacy.clip_norm=0.01",
               "privacy.noise_multiplier=1.0", rounds=1)
    row = _rows(run)[1]
    accountant = Accountant(_section("privacy.noise_multiplier=1.0"), 3, 3)
    assert row["dp_epsilon"] == accountant.epsilon(1)
    assert row["server_stats"]["dp_clipped"] == 3 and not row["rejected"]
    assert math.isfinite(row["eval_loss"])


def test_a_secret_noise_key_is_drawn_per_run_and_checkpointed(tmp_path, monkeypatch):
    secret = DP[:2]  # no noise_seed: the default key is the secret one
    first = _final(_run(tmp_path, "first", *secret, rounds=1))
    second = _final(_run(tmp_path, "second", *secret, rounds=1))
    assert any(not torch.equal(v, second[k]) for k, v in first.items())  # the OS's bits
    keys = iter([7, 7, 8])  # the whole run's, the part's, the resumed part's fresh draw
    monkeypatch.setattr("fedbits.privacy.secrets.randbits", lambda bits: next(keys))
    whole = _run(tmp_path, "whole", *secret, rounds=2)
    _run(tmp_path, "part", *secret, rounds=1)
    resumed = _run(tmp_path, "part", *secret, rounds=2, resume=True)
    assert_same_final_and_ledger(whole, resumed)  # key 7 came back from the checkpoint
