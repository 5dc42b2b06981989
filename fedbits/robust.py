"""Robust aggregation: no single client can wreck the global model (docs/robust.md).

A client's update is a claim the server cannot check against data it never sees, so
nothing in it counts without a bound. The ``[robust]`` section composes four defences,
each a small function or class here, over the updates the methods have already decoded
(a Flower strategy cannot see inside a fedbits payload):

* the weight a claimed sample count earns is capped, or every client weighs the same;
* each update's L2 norm is clipped (:func:`update_norm`, :func:`scale_`);
* the updates combine by the weighted mean, the coordinate-wise median, the trimmed
  mean or Multi-Krum (:func:`coordinate_median`, :func:`trimmed_mean`,
  :func:`multi_krum`);
* an aggregate that would make the model non-finite is refused (:func:`finite`).

The ``auto`` bounds are a multiple of a median taken from data, never from a constant:
the median over the updates accepted in the last ``history_rounds`` rounds
(:class:`Reference`). They are known before a round's first update arrives, so the
mean folds each update as it is decoded (one accumulator, not one change per client).
A round with no history (round 1) takes its own median instead: the aggregators that
hold the round's updates clip them against it at aggregation; the streaming mean has
folded each update already, so it refuses the round's aggregate if any exceeds it.

The dense and block servers use :class:`RobustAggregator`; FedKSeed, whose updates are
seed scalars, uses :class:`SeedDefence`. The history both keep goes into the server's
checkpoint, so a resumed run clips exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedbits.config import RobustSection

logger = logging.getLogger(__name__)

CHUNK = 1 << 18
"""Values per slice when a tensor is measured, scaled or combined across clients: the
temporaries stay a few megabytes whatever the model's size."""

LARGEST_CHANGE = math.sqrt(torch.finfo(torch.float32).max)
"""Above this (about 1.8e19) a value's square overflows float32: a server optimizer's
second moments (FedAdam, FedYogi, FedAdagrad) would turn infinite and freeze the model."""


class Change(Protocol):
    """A decoded update as the defences read and adjust it (a method's ``DeltaUpdate``)."""

    client: int
    num_samples: int
    delta: dict[str, torch.Tensor]


class Scalars(Protocol):
    """A FedKSeed update as its defence reads it."""

    num_samples: int
    values: np.ndarray


# ----------------------------------------------------------------------- the maths


def _peak(t: torch.Tensor) -> float:
    """The largest |value| of ``t``."""
    return float(torch.linalg.vector_norm(t, ord=math.inf)) if t.numel() else 0.0


def _tensor_norm(t: torch.Tensor) -> float:
    """The L2 norm of ``t``: in float32 on its own device (no copy, any device: MPS has
    no float64), and where that overflows (values near float32's largest, 3e38, square
    to 1e77) as its peak × the norm of ``t`` / peak, a slice at a time."""
    t = t.detach()
    norm = float(torch.linalg.vector_norm(t, dtype=torch.float32))
    if math.isfinite(norm):
        return norm
    peak = _peak(t)
    return peak * math.sqrt(sum(float(torch.linalg.vector_norm(part / peak)) ** 2
                                for part in t.reshape(-1).split(CHUNK)))


def update_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all ``tensors`` together; finite for any finite values, so an
    attacker's 3e38 update is clipped rather than passed on as "inf"."""
    return math.sqrt(sum(_tensor_norm(t) ** 2 for t in tensors))


@torch.no_grad()
def scale_(tensors: Iterable[torch.Tensor], factor: float) -> None:
    """Multiply ``tensors`` in place by ``factor`` < 1, through their peak: a factor
    such as 1e-42 (clipping a 3e38 update) is below float32's normal range, while
    1 / peak and factor × peak are not."""
    for t in tensors:
        peak = _peak(t)
        if peak > 0:
            t.div_(peak).mul_(factor * peak)


def finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value is finite and its square too (|x| <= :data:`LARGEST_CHANGE`).
    A NaN fails: its maximum is NaN, which compares false."""
    return all(bool(torch.linalg.vector_norm(t, ord=math.inf) <= LARGEST_CHANGE)
               for t in tensors if t.numel())


def weighted_mean(
    tensors: Sequence[torch.Tensor], weights: Sequence[int], like: torch.Tensor
) -> torch.Tensor:
    """Σ wᵢ·tᵢ / Σ wᵢ in float32 on ``like``'s device, added in order (as FedAvg always
    has: an honest run aggregates bit for bit as before)."""
    total = sum(weights)
    acc = torch.zeros_like(like, dtype=torch.float32)
    for t, w in zip(tensors, weights, strict=True):
        acc.add_(t.to(acc.device, torch.float32), alpha=w / total)
    return acc


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """The median over dim 0 of ``stacked`` (clients × values); for an even count the
    mean of the two middle values, halved before adding so 3e38 does not overflow."""
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2]
    return ordered[n // 2 - 1] / 2 + ordered[n // 2] / 2


def trimmed_mean(stacked: torch.Tensor, trim: int) -> torch.Tensor:
    """The mean over dim 0 of ``stacked`` without its ``trim`` smallest and ``trim``
    largest values per coordinate (Yin et al. 2018)."""
    n = stacked.shape[0]
    if not 0 <= 2 * trim < n:
        raise ValueError(f"cannot trim {trim} values from each end of {n}")
    return stacked.sort(dim=0).values[trim : n - trim].mean(dim=0)


def pairwise_sq_distances(
    updates: Sequence[Mapping[str, torch.Tensor]], names: Iterable[str]
) -> torch.Tensor:
    """The squared L2 distances between whole updates over tensors ``names`` (n × n,
    float64 on the CPU), a slice at a time so no n × n × values temporary is built.
    A distance beyond float32 (an unclipped 3e38 update) is inf: farthest, as it is."""
    n = len(updates)
    dist = torch.zeros((n, n), dtype=torch.float64)
    for name in names:
        flats = [u[name].detach().reshape(-1) for u in updates]
        for start in range(0, flats[0].numel(), CHUNK):
            part = torch.stack([f[start : start + CHUNK] for f in flats]).float()
            d = torch.cdist(part, part, compute_mode="donot_use_mm_for_euclid_dist")
            dist += d.cpu().double().square()
    return dist


def multi_krum(sq_dist: torch.Tensor, f: int, m: int) -> list[int]:
    """The positions of the ``m`` updates with the lowest Krum scores (Blanchard et al.
    2017, Multi-Krum): an update's score is the sum of its squared distances to its
    n − f − 2 nearest others, so one far from every honest update scores high. Ties go
    to the earlier position (deterministic)."""
    n = sq_dist.shape[0]
    k = n - f - 2
    if k < 1 or not 1 <= m <= n:
        raise ValueError(f"Multi-Krum needs n >= f + 3 and 1 <= m <= n, got n={n} f={f} m={m}")
    others = sq_dist + torch.diag(torch.full((n,), math.inf, dtype=sq_dist.dtype))
    scores = others.sort(dim=1).values[:, :k].sum(dim=1).tolist()
    ranked = sorted(range(n), key=lambda i: (scores[i], i))
    return sorted(ranked[:m])


def by_slices(
    tensors: Sequence[torch.Tensor], rule: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
) -> torch.Tensor:
    """``rule`` (clients × values -> values) over ``tensors`` stacked a slice at a time,
    on ``like``'s device, in float32: an order statistic never stacks a whole tensor."""
    out = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
    flats = [t.detach().reshape(-1) for t in tensors]
    for start in range(0, out.numel(), CHUNK):
        part = torch.stack([f[start : start + CHUNK].to(out.device, torch.float32)
                            for f in flats])
        out[start : start + CHUNK] = rule(part)
    return out.view(like.shape)


# ----------------------------------------------------------------------- bounds


class Reference:
    """A bound on one statistic of an update (its norm, its claim, a scalar's size):
    a fixed number, none (``"off"``), or (``"auto"``) ``multiple`` × the median of the
    values accepted in the last ``rounds`` rounds, or of the round's own values when
    there is no such round yet. A median of zero carries no scale: no bound then."""

    def __init__(self, setting: float | str, multiple: float, rounds: int) -> None:
        self.setting, self.multiple, self.rounds = setting, multiple, rounds
        self.past: list[list[float]] = []  # per round, oldest first

    def bound(self, this_round: Sequence[float] = ()) -> float | None:
        """The bound before this round's values are known (``this_round`` empty), or
        with them as the fallback for a round without history."""
        if self.setting == "off":
            return None
        if not isinstance(self.setting, str):
            return float(self.setting)
        values = [v for past in self.past for v in past] or list(this_round)
        median = float(np.median(values)) if values else 0.0
        return self.multiple * median if median > 0 else None

    def push(self, values: Sequence[float]) -> None:
        """Record a round's accepted values; the oldest round beyond ``rounds`` goes."""
        if values:
            self.past = [*self.past, [float(v) for v in values]][-self.rounds :]

    def state_dict(self) -> list[torch.Tensor]:
        return [torch.tensor(values, dtype=torch.float64) for values in self.past]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        self.past = [t.tolist() for t in state]


def claims_reference(cfg: RobustSection) -> Reference:
    return Reference(cfg.max_weight, cfg.weight_multiple, cfg.history_rounds)


def weight_of(claim: int, cap: float | None, cfg: RobustSection) -> int:
    """What a claimed sample count weighs: 1 with uniform weighting, else the claim up
    to ``cap`` (rounded down, at least 1)."""
    if cfg.server_weighting == "uniform":
        return 1
    return claim if cap is None else min(claim, max(1, math.floor(cap)))


# ----------------------------------------------------------------------- dense and blocks


@dataclass
class Outcome:
    """A round's combined change per tensor (empty when refused) and what the defences did."""

    changes: dict[str, torch.Tensor]
    stats: dict[str, float]


class RobustAggregator:
    """The defences of a method that averages weight changes (fedavg, fedit, flasc,
    partial, fedcybgd). The method keeps its maths (which tensors, which server rule);
    this decides what each update may contribute and combines them.

    :meth:`admit` runs when an update is decoded: it measures it and, where the bounds
    are known before the round (history, or a number), clips and caps it at once.
    Then either the method folds it into its streaming sum and calls :meth:`streamed`
    (``aggregator = "mean"``, :attr:`streams`), or the round's updates are held and
    :meth:`combine` applies the aggregator to them."""

    def __init__(self, cfg: RobustSection, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.norms = Reference(cfg.norm_bound, cfg.norm_multiple, cfg.history_rounds)
        self.claims = claims_reference(cfg)
        self.round: int | None = None
        self.seen: dict[int, tuple[float, int]] = {}  # this round: client -> (norm, claim)
        self.held: dict[int, Change] = {}  # this round's changes, where the method holds none
        self.bound: float | None = None  # this round's bounds, fixed at its first update
        self.cap: float | None = None
        self.clipped = self.capped = 0

    @property
    def streams(self) -> bool:
        """Whether the round's updates can be folded one at a time (the mean)."""
        return self.cfg.aggregator == "mean"

    def _start(self, round_: int) -> None:
        if self.round != round_:  # a new round (or one redone after a crash)
            self.round, self.seen, self.held, self.clipped, self.capped = round_, {}, {}, 0, 0
            self.bound, self.cap = self.norms.bound(), self.claims.bound()

    @torch.no_grad()
    def admit(self, round_: int, update: Change) -> None:
        """Measure a checked update (on the model's device) and bound it with what is
        known before the round; call last in ``decode_uplink``, once nothing else can
        reject the client."""
        self._start(round_)
        update.delta = {n: t.to(self.device) for n, t in update.delta.items()}
        norm = update_norm(update.delta.values())
        self.seen[update.client] = (norm, update.num_samples)
        self._bound(update, norm, self.bound, self.cap)

    def hold(self, update: Change) -> None:
        """Keep an admitted change until :meth:`combine` (a method whose runtime update
        carries no change, as the dense servers' do): cohort × trained tensors, on the
        model's device."""
        self.held[update.client] = update

    def held_for(self, updates: Sequence[Change]) -> list[Change]:
        """The held changes of ``updates``' clients, in their order; handed over."""
        held, self.held = self.held, {}
        if any(u.client not in held for u in updates):
            raise RuntimeError("aggregate got updates that were not held "
                               "(the runtime aggregates what it decoded)")
        return [held[u.client] for u in updates]

    def _bound(self, update: Change, norm: float, bound: float | None, cap: float | None) -> None:
        if bound is not None and norm > bound:
            scale_(update.delta.values(), bound / norm)
            self.clipped += 1
        self.capped += self._capped(update.num_samples, cap)
        update.num_samples = weight_of(update.num_samples, cap, self.cfg)

    def _capped(self, claim: int, cap: float | None) -> bool:
        """Whether ``cap`` lowers this claim's weight (with sample weighting)."""
        samples = self.cfg.server_weighting == "samples"
        return samples and weight_of(claim, cap, self.cfg) < claim

    def _late(self) -> tuple[float | None, float | None]:
        """The bounds a round without history takes from its own updates (None where
        the bound was known at admission, or there is none)."""
        norms = [n for n, _ in self.seen.values()]
        claims = [c for _, c in self.seen.values()]
        return (self.norms.bound(norms) if self.bound is None else None,
                self.claims.bound(claims) if self.cap is None else None)

    def _check(self, round_: int, updates: Sequence[Change]) -> None:
        if self.round != round_ or any(u.client not in self.seen for u in updates):
            raise RuntimeError(f"round {round_}: aggregate got updates that were not "
                               "admitted (the runtime aggregates what it decoded)")

    def streamed(self, round_: int, updates: Sequence[Change],
                 means: dict[str, torch.Tensor]) -> Outcome:
        """The streaming mean's aggregate ``means``, unless a defence refuses it: in a
        round without history an update beyond the round's own bounds was folded in
        unclipped (the mean cannot take it back), or the aggregate is not finite."""
        self._check(round_, updates)
        bound, cap = self._late()
        over = [c for c, (norm, claim) in self.seen.items()
                if (bound is not None and norm > bound) or self._capped(claim, cap)]
        if over:
            logger.warning(
                "round %d: client(s) %s exceed this round's own bounds (norm above %s, claim "
                "above %s) and no earlier round gives one to clip against before folding: "
                "the streaming mean's aggregate is refused, the model is unchanged (an "
                "order-statistic robust.aggregator holds the round and clips instead)",
                round_, ", ".join(map(str, over)), _fmt(bound), _fmt(cap))
            return self._finish(round_, {}, bound, refused=True)
        return self._finish(round_, means, bound)

    @torch.no_grad()
    def combine(self, round_: int, updates: Sequence[Change],
                like: Mapping[str, torch.Tensor]) -> Outcome:
        """Combine held ``updates`` per tensor of ``like`` (over the updates that hold
        it) by the aggregator; a round without history is first bounded by its own."""
        self._check(round_, updates)
        bound, cap = self._late()
        if bound is not None or cap is not None:
            for u in updates:
                self._bound(u, self.seen[u.client][0], bound, cap)
        kept = self._krum(updates) if self.cfg.aggregator == "multi_krum" else updates
        changes = {}
        for name, p in like.items():
            writers = [u for u in kept if name in u.delta]
            if writers:
                changes[name] = self._tensor(name, writers, p)
        kept_stat = {"robust_kept": len(kept)} if self.cfg.aggregator == "multi_krum" else {}
        return self._finish(round_, changes, bound, extra=kept_stat)

    def _tensor(self, name: str, writers: Sequence[Change], like: torch.Tensor) -> torch.Tensor:
        tensors = [u.delta[name] for u in writers]
        if self.cfg.aggregator == "median":
            return by_slices(tensors, coordinate_median, like)
        if self.cfg.aggregator == "trimmed_mean":
            trim = math.floor(self.cfg.trim_fraction * len(tensors))
            return by_slices(tensors, lambda s: trimmed_mean(s, trim), like)
        return weighted_mean(tensors, [u.num_samples for u in writers], like)

    def _krum(self, updates: Sequence[Change]) -> list[Change]:
        """Multi-Krum among the updates that hold the same tensors (a block method's
        clients of one block); a group too small to score keeps all of its updates."""
        groups: dict[frozenset[str], list[Change]] = {}
        for u in updates:
            groups.setdefault(frozenset(u.delta), []).append(u)
        kept: list[Change] = []
        for names, group in groups.items():
            f, m = self.cfg.krum(len(group))
            if len(group) < 3:
                kept += group
                continue
            dist = pairwise_sq_distances([u.delta for u in group], sorted(names))
            kept += [group[i] for i in multi_krum(dist, f, m)]
        position = {id(u): i for i, u in enumerate(updates)}
        return sorted(kept, key=lambda u: position[id(u)])

    def _finish(self, round_: int, changes: dict[str, torch.Tensor], bound: float | None,
                refused: bool = False, extra: Mapping[str, float] | None = None) -> Outcome:
        """Refuse a non-finite aggregate, record the round's norms and claims, report."""
        if not refused and not finite(changes.values()):
            logger.warning("round %d: the aggregate has values that are not finite (or beyond "
                           "%.3g): refused, the model is unchanged", round_, LARGEST_CHANGE)
            refused = True
        self.norms.push([n for n, _ in self.seen.values()])
        self.claims.push([c for _, c in self.seen.values()])
        used = self.bound if self.bound is not None else bound
        stats = report(self.clipped, self.capped, refused, ("robust_norm_bound", used))
        return Outcome({} if refused else changes, {**stats, **(extra or {})})

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self.norms.state_dict(), "claims": self.claims.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state without history (a server state written
        before ``[robust]``, or built by hand) starts with none."""
        self.norms.load_state_dict(state.get("norms", []))
        self.claims.load_state_dict(state.get("claims", []))
        self.round = None


def report(clipped: int, capped: int, refused: bool,
           bound: tuple[str, float | None]) -> dict[str, float]:
    """A round's ``server_stats`` from the defences: only what happened, so an honest
    round reports nothing; ``bound`` (its key and value) when something was clipped or
    the round refused."""
    counts = {"robust_clipped": clipped, "robust_capped": capped, "robust_refused": int(refused)}
    stats: dict[str, float] = {key: n for key, n in counts.items() if n}
    name, value = bound
    if (clipped or refused) and value is not None:
        stats[name] = value
    return stats


def _fmt(bound: float | None) -> str:
    return "none" if bound is None else f"{bound:.4g}"


# ----------------------------------------------------------------------- FedKSeed


@dataclass
class BoundedScalars:
    """A round of FedKSeed updates after the defences: clipped scalars and weights."""

    values: list[np.ndarray]
    weights: list[int]
    stats: dict[str, float]


class SeedDefence:
    """FedKSeed's defences. An update is its τ scalars (one per local step, or per
    touched seed): each is clipped to ``scalar_bound`` (by default ``scalar_multiple``
    × the median |scalar| of recent rounds: a loose constant such as
    ``method.max_scalar`` lets one client move the model by thousands of steps); then
    the update's L2 norm, over its scalars, to ``norm_bound`` as a dense update's is
    (a client whose every scalar sits just under the scalar bound is still one client);
    a claimed sample count weighs at most ``max_weight``. The server holds a round's
    scalars anyway, so a round without history is bounded by its own."""

    def __init__(self, cfg: RobustSection) -> None:
        self.cfg = cfg
        self.scalars = Reference(cfg.scalar_bound, cfg.scalar_multiple, cfg.history_rounds)
        self.norms = Reference(cfg.norm_bound, cfg.norm_multiple, cfg.history_rounds)
        self.claims = claims_reference(cfg)

    def bound(self, updates: Sequence[Scalars]) -> BoundedScalars:
        """Clip and weigh a round's updates; record their statistics for later rounds."""
        sizes = [float(v) for u in updates for v in np.abs(u.values)]
        limit = self.scalars.bound(sizes)
        values = [u.values if limit is None else np.clip(u.values, -limit, limit)
                  for u in updates]
        norms = [float(np.linalg.norm(v)) for v in values]
        bound = self.norms.bound(norms)
        clipped = [limit is not None and bool(np.any(np.abs(u.values) > limit))
                   for u in updates]
        for i, norm in enumerate(norms):
            if bound is not None and norm > bound:
                values[i], clipped[i] = values[i] * (bound / norm), True
        claims = [u.num_samples for u in updates]
        cap = self.claims.bound(claims)
        weights = [weight_of(c, cap, self.cfg) for c in claims]
        capped = (sum(w < c for w, c in zip(weights, claims, strict=True))
                  if self.cfg.server_weighting == "samples" else 0)
        stats = report(sum(clipped), capped, False, ("robust_scalar_bound", limit))
        self.scalars.push(sizes)
        self.norms.push(norms)
        self.claims.push(claims)
        return BoundedScalars(values, weights, stats)

    def state_dict(self) -> dict[str, Any]:
        return {"scalars": self.scalars.state_dict(), "norms": self.norms.state_dict(),
                "claims": self.claims.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """As :meth:`RobustAggregator.load_state_dict`."""
        self.scalars.load_state_dict(state.get("scalars", []))
        self.norms.load_state_dict(state.get("norms", []))
        self.claims.load_state_dict(state.get("claims", []))
