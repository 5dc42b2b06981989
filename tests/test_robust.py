"""Robust aggregation ([robust], fedbits.robust): the maths of each aggregator, every
attack value against the default defences, config errors, checkpoints, and tiny-model
runs in which one client's hostile update is neutralised by the defaults and harms
with the defences off."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedbits.compress.tensors import read_values, write_values
from fedbits.config import RobustSection
from fedbits.errors import ClientError, ConfigError
from fedbits.methods._dense import DenseClient
from fedbits.methods._updates import DeltaUpdate, check_change
from fedbits.methods.fedkseed.protocol import SeedUpdate
from fedbits.methods.fedkseed.server import FedKSeedServer
from fedbits.resolve import load_config
from fedbits.robust import (
    LARGEST_CHANGE,
    Reference,
    RobustAggregator,
    SeedDefence,
    by_slices,
    coordinate_median,
    finite,
    multi_krum,
    pairwise_sq_distances,
    scale_,
    trimmed_mean,
    update_norm,
    weighted_mean,
)
from fedbits.runtime import run_experiment
from fedbits.runtime.setup import prepare_run
from fedbits.wire import Direction, Reader, Writer

from conftest import REPO, TINY

pytestmark = pytest.mark.usefixtures("one_thread")

HUGE = 3e38  # finite in float32, near its largest
CLAIM = 2**32 - 1  # the largest sample count a u32 field carries
OFF = ["robust.norm_bound=off", "robust.max_weight=4294967295", "robust.scalar_bound=off",
       "robust.aggregator=mean"]
"""Every defence turned off (the weight cap as high as a claim can go)."""


def _update(client: int, values: list[float], claim: int = 10) -> DeltaUpdate:
    return DeltaUpdate(client, claim, 1.0, {"w": torch.tensor(values, dtype=torch.float32)})


def _round(agg: RobustAggregator, round_: int, updates: list[DeltaUpdate]) -> list[DeltaUpdate]:
    for u in updates:
        agg.admit(round_, u)
    return updates


def _mean(agg: RobustAggregator, round_: int, updates: list[DeltaUpdate]):
    """The streaming mean's path: admit each, fold by weight, then the round's verdict."""
    _round(agg, round_, updates)
    total = sum(u.num_samples for u in updates)
    means = {"w": sum(u.delta["w"] * (u.num_samples / total) for u in updates)}
    return agg.streamed(round_, updates, means)


LIKE = {"w": torch.zeros(3)}


# ---------------------------------------------------------------------- the maths


def test_coordinate_median_odd_even_and_at_the_edge_of_float32():
    x = torch.tensor([[1.0, 5.0], [3.0, -1.0], [2.0, 100.0]])
    assert torch.equal(coordinate_median(x), torch.tensor([2.0, 5.0]))
    assert torch.equal(coordinate_median(x[:2]), torch.tensor([2.0, 2.0]))  # mean of the two
    edge = torch.tensor([[HUGE], [HUGE], [-HUGE], [HUGE]])
    assert torch.equal(coordinate_median(edge), torch.tensor([HUGE]))  # no overflow to inf


def test_trimmed_mean_drops_each_end_per_coordinate():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 9.0], [100.0, 0.0], [-50.0, 3.0]])
    assert torch.equal(trimmed_mean(x, 1), torch.tensor([2.0, 1.0]))
    assert torch.equal(trimmed_mean(x, 0), x.mean(0))
    with pytest.raises(ValueError, match="cannot trim 3"):
        trimmed_mean(x, 3)


def test_multi_krum_keeps_the_updates_near_each_other():
    near = [torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9]), torch.tensor([0.9, 1.0]),
             torch.tensor([1.0, 1.2])]
    far = torch.tensor([-30.0, 40.0])
    updates = [{"w": t} for t in [near[0], far, *near[1:]]]
    dist = pairwise_sq_distances(updates, ["w"])
    assert dist[0, 1].item() == pytest.approx(31**2 + 39**2)
    assert multi_krum(dist, f=1, m=3) == [0, 2, 3]  # the far one and the worst near one go
    assert multi_krum(dist, f=1, m=4) == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="n >= f \\+ 3"):
        multi_krum(dist, f=3, m=1)


def test_pairwise_distances_span_slices_and_tensors(monkeypatch):
    monkeypatch.setattr("fedbits.robust.CHUNK", 4)  # several slices per tensor
    gen = torch.Generator().manual_seed(0)
    updates = [{"a": torch.randn(10, generator=gen), "b": torch.randn(3, 2, generator=gen)}
               for _ in range(4)]
    flat = torch.stack([torch.cat([u["a"], u["b"].reshape(-1)]) for u in updates]).double()
    want = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    torch.testing.assert_close(pairwise_sq_distances(updates, ["a", "b"]), want, rtol=1e-5,
                               atol=1e-5)
    ordered = torch.stack([u["a"] for u in updates]).sort(0).values
    got = by_slices([u["a"] for u in updates], coordinate_median, updates[0]["a"])
    torch.testing.assert_close(got, (ordered[1] + ordered[2]) / 2)


def test_norm_and_clip_survive_values_near_float32s_largest(monkeypatch):
    monkeypatch.setattr("fedbits.robust.CHUNK", 5)
    t = torch.full((12,), HUGE)
    assert torch.linalg.vector_norm(t).isinf()  # what float32 makes of it
    norm = update_norm([t])
    assert norm == pytest.approx(HUGE * math.sqrt(12), rel=1e-6)
    scale_([t], 2.0 / norm)  # a factor below float32's smallest normal
    assert update_norm([t]) == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(t, torch.full((12,), t[0].item()))


def test_finite_refuses_nan_inf_and_values_whose_square_overflows():
    assert finite([torch.zeros(3), torch.tensor([LARGEST_CHANGE * 0.99])])
    for bad in (math.nan, math.inf, -math.inf, LARGEST_CHANGE * 1.01, HUGE):
        assert not finite([torch.zeros(3), torch.tensor([1.0, bad])]), bad
    assert finite([torch.zeros(0)])


def test_weighted_mean_is_fedavgs_arithmetic():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    torch.testing.assert_close(weighted_mean([a, b], [1, 3], a), (a + 3 * b) / 4)


def test_reference_medians_history_fallback_off_and_numbers():
    ref = Reference("auto", 3.0, rounds=2)
    assert ref.bound() is None  # no history, nothing of this round
    assert ref.bound([1.0, 2.0, 9.0]) == 6.0  # a round without history: its own median
    assert Reference("auto", 3.0, 2).bound([0.0, 0.0, 5.0]) is None  # a zero median: no scale
    ref.push([1.0, 2.0, 100.0])
    ref.push([])  # a round with nothing accepted leaves the history as it was
    assert ref.bound([50.0]) == 6.0  # history wins over this round
    ref.push([4.0])
    ref.push([10.0, 20.0])  # the first round falls out of a 2-round window
    assert ref.past == [[4.0], [10.0, 20.0]] and ref.bound() == 30.0
    copy = Reference("auto", 3.0, 2)
    copy.load_state_dict(ref.state_dict())
    assert copy.past == ref.past
    assert Reference("off", 3.0, 2).bound([1.0]) is None
    assert Reference(7.5, 3.0, 2).bound() == 7.5


# ---------------------------------------------------------------------- attacks, unit level


def test_check_change_refuses_nan_changes_nan_losses_and_zero_claims():
    good = {"w": torch.ones(3)}
    check_change("client 1 uplink", 5, 1.5, good)
    for loss in (math.nan, math.inf, -math.inf):
        with pytest.raises(ClientError, match="client 1 uplink: reports train_loss .* not a fin"):
            check_change("client 1 uplink", 5, loss, good)
    with pytest.raises(ClientError, match="non-finite values in the update of w"):
        check_change("client 1 uplink", 5, 1.0, {"w": torch.tensor([1.0, math.nan])})
    with pytest.raises(ClientError, match="zero training samples"):
        check_change("client 1 uplink", 0, 1.0, good)


@pytest.mark.parametrize("factor", [1e6, HUGE])
def test_a_scaled_or_huge_update_is_clipped_to_the_recent_median(factor):
    agg = RobustAggregator(RobustSection(), torch.device("cpu"))
    _mean(agg, 1, [_update(0, [1, 0, 0]), _update(1, [0, 1, 0]), _update(2, [0, 0, 1])])
    bad = _update(0, [factor, factor, factor])
    outcome = _mean(agg, 2, [bad, _update(1, [0, 2, 0]), _update(2, [0, 0, 1])])
    assert update_norm(bad.delta.values()) == pytest.approx(3.0, rel=1e-6)  # 3 × median 1
    assert outcome.stats == {"robust_clipped": 1, "robust_norm_bound": 3.0}
    assert finite(outcome.changes.values())


def test_a_claim_of_2_32_is_capped_at_a_multiple_of_the_median_claim():
    agg = RobustAggregator(RobustSection(), torch.device("cpu"))
    _mean(agg, 1, [_update(c, [1, 1, 1], claim=n) for c, n in enumerate((10, 20, 30))])
    liar = _update(0, [1, 1, 1], claim=CLAIM)
    outcome = _mean(agg, 2, [liar, _update(1, [1, 1, 1], 20)])
    assert liar.num_samples == 80 and outcome.stats["robust_capped"] == 1  # 4 × median 20
    uniform = RobustAggregator(RobustSection(server_weighting="uniform"), torch.device("cpu"))
    assert [u.num_samples for u in _round(uniform, 1, [_update(0, [1], CLAIM)])] == [1]


def test_without_history_the_streaming_mean_refuses_a_round_it_cannot_clip(caplog):
    agg = RobustAggregator(RobustSection(), torch.device("cpu"))
    outcome = _mean(agg, 1, [_update(0, [1e6, 0, 0]), _update(1, [1, 0, 0]),
                             _update(2, [0, 1, 0])])
    assert outcome.changes == {} and outcome.stats["robust_refused"] == 1
    assert "client(s) 0 exceed this round's own bounds" in caplog.text
    liar = RobustAggregator(RobustSection(), torch.device("cpu"))
    outcome = _mean(liar, 1, [_update(0, [1, 0, 0], CLAIM), _update(1, [1, 0, 0]),
                              _update(2, [0, 1, 0])])
    assert outcome.stats == {"robust_refused": 1, "robust_norm_bound": 3.0}
    # the round's norms and claims still become the history: round 2 clips and caps
    outcome = _mean(agg, 2, [_update(0, [1e6, 0, 0]), _update(1, [1, 0, 0])])
    assert outcome.stats == {"robust_clipped": 1, "robust_norm_bound": 3.0}


def test_an_honest_first_round_is_not_touched():
    agg = RobustAggregator(RobustSection(), torch.device("cpu"))
    updates = [_update(0, [1, 0, 0]), _update(1, [0, 2, 0], claim=30), _update(2, [0, 0, 1])]
    before = [u.delta["w"].clone() for u in updates]
    outcome = _mean(agg, 1, updates)
    assert outcome.stats == {}  # an honest round reports nothing
    assert all(torch.equal(u.delta["w"], b) for u, b in zip(updates, before, strict=True))
    assert [u.num_samples for u in updates] == [10, 30, 10]


def test_a_non_finite_aggregate_is_refused(caplog):
    agg = RobustAggregator(RobustSection(norm_bound="off"), torch.device("cpu"))
    updates = _round(agg, 1, [_update(0, [HUGE, 0, 0]), _update(1, [HUGE, 0, 0])])
    outcome = agg.streamed(1, updates, {"w": torch.tensor([math.inf, 0.0, 0.0])})
    assert outcome.changes == {} and outcome.stats["robust_refused"] == 1
    assert "not finite" in caplog.text


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "multi_krum"])
def test_order_statistics_ignore_a_sign_flipped_or_huge_update(aggregator):
    cfg = RobustSection(aggregator=aggregator, trim_fraction=0.2, norm_bound="off")
    honest = [[1.0, 2.0, 3.0], [1.1, 2.1, 2.9], [0.9, 1.9, 3.1], [1.0, 2.2, 3.0]]
    for attack in ([-10.0, -20.0, -30.0], [HUGE, -HUGE, HUGE]):
        agg = RobustAggregator(cfg, torch.device("cpu"))
        updates = _round(agg, 1, [_update(0, attack)] + [_update(c, v)
                                                          for c, v in enumerate(honest, 1)])
        change = agg.combine(1, updates, LIKE).changes["w"]
        lo, hi = torch.tensor(honest).min(0).values, torch.tensor(honest).max(0).values
        assert bool(((change >= lo) & (change <= hi)).all()), (aggregator, attack, change)


def test_held_rounds_without_history_clip_against_their_own_median():
    agg = RobustAggregator(RobustSection(aggregator="median"), torch.device("cpu"))
    bad = _update(0, [1e6, 0, 0])
    updates = _round(agg, 1, [bad, _update(1, [1, 0, 0]), _update(2, [0, 1, 0], CLAIM)])
    outcome = agg.combine(1, updates, LIKE)
    assert update_norm(bad.delta.values()) == pytest.approx(3.0)
    assert updates[2].num_samples == 40  # 4 × the median claim 10
    assert outcome.stats == {"robust_clipped": 1, "robust_capped": 1, "robust_norm_bound": 3.0}


def test_aggregate_refuses_updates_that_were_not_admitted():
    agg = RobustAggregator(RobustSection(), torch.device("cpu"))
    _round(agg, 1, [_update(0, [1, 0, 0])])
    with pytest.raises(RuntimeError, match="not admitted"):
        agg.streamed(1, [_update(5, [1, 0, 0])], {"w": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="not held"):
        agg.held_for([_update(5, [1, 0, 0])])


def _seeds(client: int, values: list[float], claim: int = 10) -> SeedUpdate:
    return SeedUpdate(client, claim, 1.0, 0, 0, np.arange(len(values)), np.array(values))


def test_fedkseed_scalars_are_clipped_to_a_multiple_of_the_recent_median():
    defence = SeedDefence(RobustSection(norm_bound="off"))
    first = defence.bound([_seeds(0, [1e6, 1e6]), _seeds(1, [1.0, -2.0]), _seeds(2, [2.0, 2.0])])
    assert first.values[0].tolist() == [20.0, 20.0]  # 10 × this round's median 2
    assert first.values[1].tolist() == [1.0, -2.0] and first.stats["robust_clipped"] == 1
    later = defence.bound([_seeds(0, [-1e6], CLAIM), _seeds(1, [4.0])])
    assert later.values[0].tolist() == [-20.0]  # the history's median, not this round's
    assert later.weights == [40, 10] and later.stats["robust_capped"] == 1
    off = SeedDefence(RobustSection(scalar_bound="off", norm_bound="off"))
    unbounded = off.bound([_seeds(0, [1e6]), _seeds(1, [1.0]), _seeds(2, [1.0])])
    assert unbounded.values[0].tolist() == [1e6] and unbounded.stats == {}


def test_fedkseed_updates_are_clipped_in_norm_over_their_scalars():
    defence = SeedDefence(RobustSection(scalar_bound="off"))
    out = defence.bound([_seeds(0, [3.0, 4.0]), _seeds(1, [0.6, 0.8]), _seeds(2, [0.0, 1.0]),
                         _seeds(3, [300.0, 400.0])])
    # norms 5, 1, 1, 500: median 3, bound 3 x 3 = 9
    np.testing.assert_allclose(out.values[3], [5.4, 7.2])
    assert out.values[0].tolist() == [3.0, 4.0] and out.stats == {"robust_clipped": 1}
    copy = SeedDefence(RobustSection())
    copy.load_state_dict(defence.state_dict())
    assert copy.norms.past == defence.norms.past == [[5.0, 1.0, 1.0, 500.0]]


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize("override, message", [
    ("robust.aggregator=krum", r"robust\.aggregator: must be one of 'mean', 'median'"),
    ("robust.norm_bound=0", r"robust\.norm_bound: must be 'auto', 'off' or a positive number"),
    ("robust.norm_bound=-1e6", r"robust\.norm_bound: must be 'auto', 'off'"),
    ("robust.norm_bound=inf", r"robust\.norm_bound: must be 'auto', 'off'"),
    ("robust.norm_bound=nan", r"robust\.norm_bound: must be 'auto', 'off'"),
    ("robust.norm_bound=true", r"robust\.norm_bound: must be 'auto', 'off'"),
    ("robust.norm_bound='3'", r"robust\.norm_bound: must be 'auto', 'off'"),
    ("robust.scalar_bound=auto2", r"robust\.scalar_bound: must be 'auto', 'off'"),
    ("robust.max_weight=0", r"robust\.max_weight: must be 'auto' or a whole number"),
    ("robust.max_weight=2.5", r"robust\.max_weight: must be 'auto' or a whole number"),
    ("robust.max_weight=off", r"robust\.max_weight: must be 'auto' or a whole number"),
    ("robust.norm_multiple=0.5", r"robust\.norm_multiple"),
    ("robust.norm_multiple=inf", r"robust\.norm_multiple"),
    ("robust.weight_multiple='4'", r"robust\.weight_multiple"),
    ("robust.trim_fraction=0.5", r"robust\.trim_fraction"),
    ("robust.history_rounds=0", r"robust\.history_rounds"),
    ("robust.server_weighting=claims", r"robust\.server_weighting: must be one of"),
    ("robust.krum_f=-1", r"robust\.krum_f"),
    ("robust.clip=1", r"robust\.clip: unknown key \(allowed: aggregator, "),
])
def test_bad_robust_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


@pytest.mark.parametrize("overrides, message", [
    (["robust.aggregator=trimmed_mean"],  # tiny.toml samples 3 clients a round
     r"robust\.trim_fraction=0\.2 trims nothing from a round of 3 clients.*at least 0\.334"),
    (["robust.aggregator=trimmed_mean", "clients.per_round=2"],
     r"trims nothing .* sample at least 3 clients a round"),
    (["robust.aggregator=multi_krum"], r"with 3 clients a round tolerates no attacker"),
    (["robust.aggregator=multi_krum", "clients.per_round=6", "robust.krum_f=2"],
     r"robust\.krum_f=2: .* n >= 2f \+ 3; with 6 clients a round f is at most 1"),
    (["robust.aggregator=multi_krum", "clients.per_round=6", "robust.krum_m=6"],
     r"robust\.krum_m=6 keeps more than the 5 updates"),
    (["method.name=fedkseed", "robust.aggregator=median"],
     r"robust\.aggregator = 'median' combines weight changes; fedkseed sums seed scalars"),
])
def test_aggregators_are_checked_against_the_cohort_and_method(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_aggregator_parameters_that_fit_are_accepted():
    cfg = load_config(TINY, ["robust.aggregator=trimmed_mean", "robust.trim_fraction=0.34"])
    assert cfg.robust.trim_fraction == 0.34
    cfg = load_config(TINY, ["robust.aggregator=multi_krum", "clients.per_round=5"])
    assert cfg.robust.krum(5) == (1, 4) and cfg.robust.krum(3) == (0, 3)
    assert load_config(TINY, ["robust.norm_bound=2"]).robust.norm_bound == 2.0


# ---------------------------------------------------------------------- runs

THREE = ["method.name=fedavg", "data.num_clients=3", "data.partition=iid",
         "clients.per_round=3", "eval.metrics=['loss']", "eval.every=100"]
"""FedAvg (the streaming mean; it learns fast enough in 3 rounds for harm to show) with
three clients, all sampled every round: client 0 is the attacker in each."""


@pytest.fixture
def client_0_attacks(monkeypatch):
    """Client 0's dense uplink carries ``attack["fn"](change)`` and claims
    ``attack["claim"]``: a hand-built body through the public codec, as a malicious
    node would send it (the client half itself is not changed)."""
    attack: dict = {}
    original = DenseClient.update

    def update(self, round_, client, downlink, data, store):
        result = original(self, round_, client, downlink, data, store)
        if client != 0 or not attack:
            return result
        r = Reader(result.body, "test uplink")
        claim, loss = r.u32("num_samples"), r.f32("train_loss")
        chain = self.chains(round_, Direction.UP, client)
        delta = read_values(r, self.layout, wire_dtype=self.wire_dtype, chain=chain,
                            field="delta").tensors
        w = Writer().u32(attack.get("claim", claim)).f32(loss)
        write_values(w, self.layout, {n: attack["fn"](t) for n, t in delta.items()},
                     wire_dtype=self.wire_dtype, chain=chain, generator=torch.Generator())
        result.body = w.getvalue()
        return result

    monkeypatch.setattr(DenseClient, "update", update)
    return attack


def _run(out: Path, name: str, *overrides: str, rounds: int = 3) -> Path:
    cfg = load_config(TINY, [f"run.out_dir={out}", f"run.name={name}", f"run.rounds={rounds}",
                             *THREE, *overrides])
    return run_experiment(cfg)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run_dir / "final").glob("*.safetensors")))


def _stat(run_dir: Path, key: str) -> list[float]:
    return [r["server_stats"].get(key, 0) for r in _rows(run_dir)[1:]]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """The honest run with the default defences."""
    return _run(tmp_path_factory.mktemp("clean"), "clean")


def test_an_honest_run_is_bit_identical_with_the_defences_on_and_off(tmp_path, clean):
    want, got = _final(_run(tmp_path, "off", *OFF)), _final(clean)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert all(r["server_stats"] == {} for r in _rows(clean)[1:])  # nothing clipped or refused


def test_a_scaled_update_is_neutralised_by_default_and_ruins_the_model_without(
        tmp_path, clean, client_0_attacks):
    reference = _rows(clean)[-1]["eval_loss"]
    client_0_attacks["fn"] = lambda t: t * 1e6
    defended = _run(tmp_path, "defended")
    assert _rows(defended)[-1]["eval_loss"] == pytest.approx(reference, rel=0.05)
    assert _stat(defended, "robust_refused") == [1, 0, 0]  # round 1: nothing to clip against
    assert _stat(defended, "robust_clipped") == [0, 1, 1]
    harmed = _rows(_run(tmp_path, "open", *OFF))[-1]["eval_loss"]
    assert harmed > 1.2 * reference


def test_3e38_everywhere_is_clipped_or_refused_never_a_nan_model(tmp_path, client_0_attacks):
    client_0_attacks["fn"] = lambda t: torch.full_like(t, HUGE)
    defended = _run(tmp_path, "defended", rounds=2)
    assert _stat(defended, "robust_clipped") == [0, 1]
    open_ = _run(tmp_path, "open", *OFF, rounds=2)
    assert _stat(open_, "robust_refused") == [1, 1]  # the weighted sums overflow to inf
    assert all(v.isfinite().all() for v in _final(open_).values())
    rows = _rows(open_)
    assert rows[-1]["eval_loss"] == rows[0]["eval_loss"]  # the model stayed as it was


def test_a_resumed_run_bounds_as_an_uninterrupted_one(tmp_path, client_0_attacks):
    client_0_attacks.update(fn=lambda t: t * 1e6, claim=CLAIM)
    whole = _run(tmp_path, "whole")
    _run(tmp_path, "part", rounds=2)
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", "run.name=part", "run.rounds=3", *THREE])
    resumed = run_experiment(cfg, resume=True)
    want, got = _final(whole), _final(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _stat(resumed, "robust_clipped") == _stat(whole, "robust_clipped") == [0, 1, 1]
    assert _stat(resumed, "robust_capped") == [0, 1, 1]  # the history came back


def test_the_median_holds_the_round_and_ignores_the_attacker(tmp_path, clean, client_0_attacks):
    client_0_attacks["fn"] = lambda t: t * 1e6
    run = _run(tmp_path, "median", "robust.aggregator=median", rounds=2)
    assert _stat(run, "robust_clipped") == [1, 1]  # round 1 clips against its own median
    assert "robust_refused" not in _rows(run)[1]["server_stats"]
    assert _rows(run)[-1]["eval_loss"] < _rows(clean)[0]["eval_loss"]  # it trains


@pytest.mark.parametrize("method", ["fedit", "partial", "fedcybgd"])
def test_servers_checkpoint_their_history(tmp_path, method):
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", f"method.name={method}", *THREE[1:]])
    from fedbits.methods import get_method

    setup = prepare_run(cfg)
    server = get_method(method).server(setup.method_context())
    server.robust.norms.push([1.0, 2.0])
    server.robust.claims.push([5.0])
    other = get_method(method).server(setup.method_context())
    other.load_state_dict(server.state_dict())
    assert other.robust.norms.past == [[1.0, 2.0]] and other.robust.claims.past == [[5.0]]


def test_partial_holds_its_blocks_for_an_order_statistic(tmp_path):
    run = _run(tmp_path, "trimmed", "method.name=partial", "robust.aggregator=trimmed_mean",
               "robust.trim_fraction=0.34", rounds=2)
    assert all(r["server_stats"]["tensors_updated"] > 0 and not r["rejected"]
               for r in _rows(run)[1:])


def test_fedkseed_refuses_a_pool_it_cannot_publish_or_that_breaks_the_model(tmp_path):
    example = REPO / "examples" / "fedkseed-tiny.toml"
    cfg = load_config(example, [f"run.out_dir={tmp_path}", "clients.lr=1e36"])
    server = FedKSeedServer(prepare_run(cfg).method_context())
    before = {n: p.detach().clone() for n, p in server.model.named_parameters()}
    digest = server.digest
    pool = server.pool.copy()
    pool[0] = 1e300  # beyond what the wire's float16 entries can carry
    assert server.accept(1, pool) is None
    pool[0] = 1e3  # publishable, but at this lr the replayed weights overflow to inf
    assert server.accept(1, pool) is None
    assert not server.pool.any()
    for name, p in server.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert server.digest == digest  # clients holding the old model are still accepted


def test_fedkseed_sends_the_whole_pool_when_an_entry_returns_to_zero(tmp_path):
    """The changes' form drops zero entries, so a pool entry back at exactly zero (two
    clipped scalars cancelling) would never reach a client: every later update would be
    refused for a digest mismatch."""
    example = REPO / "examples" / "fedkseed-tiny.toml"
    server = FedKSeedServer(prepare_run(load_config(example, [f"run.out_dir={tmp_path}"]))
                            .method_context())
    server.downlink(1, 0)
    server.views[0] = server._sent.pop(0)
    assert server.accept(1, np.eye(1, len(server.pool), 3)[0]) is not None
    incremental = server.downlink(2, 0)
    assert incremental[0] == 0  # only the changed entry 3
    server.views[0] = server._sent.pop(0)
    assert server.accept(2, np.zeros(len(server.pool))) is not None
    assert server.downlink(3, 0)[0] == 1  # the whole pool: entry 3 is zero again
