"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning
differentially private recurrent language models"; docs/privacy.md).

What one client contributes to a round must be bounded before noise can hide it, so the
``[privacy]`` section adds two steps to the servers of the methods that average weight
changes (fedavg, fedit, flasc, partial):

* each decoded update, all its tensors together, is scaled down to L2 norm
  ``clip_norm`` = C (:meth:`ClientLevelDP.clip`, with :mod:`fedbits.robust`'s chunked
  norm and scaling, which survive values near float32's largest);
* the round's sum of clipped updates gets Gaussian noise of standard deviation
  σ = ``noise_multiplier`` × C per value, once, and is divided by the number of clients
  the round samples, not by how many answered (:meth:`ClientLevelDP.release_`): the
  fixed-denominator estimator, whose denominator says nothing about who took part. The
  noise on the mean is z·C / cohort.

Adding or removing one client's whole dataset then moves the sum by at most C, and the
rounds are the Poisson-subsampled Gaussian mechanism with rate q = cohort / clients, so
:class:`Accountant` reports the (ε, δ) the released models carry after each round
(opacus' Rényi-DP accountant). fedbits samples a fixed-size cohort without replacement;
the Poisson analysis is the usual approximation of it (docs/privacy.md says what that
does and does not cover).

The noise is drawn on the server's device, into the aggregate in place, from a generator
seeded by (key, round), where the key is ``run.seed`` or (``noise_seed = "secret"``) one
the server draws from the operating system and checkpoints: a resumed run draws what an
uninterrupted one did, and nothing here grows with the number of clients. Whoever knows
the key can regenerate the noise and subtract it (docs/privacy.md).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedbits.config import PrivacySection
from fedbits.robust import CHUNK, scale_, update_norm
from fedbits.seeding import derive_seed


def clip_(tensors: Iterable[torch.Tensor], clip_norm: float) -> bool:
    """Scale ``tensors`` in place so their joint L2 norm is at most ``clip_norm``;
    whether they had to be."""
    tensors = list(tensors)
    norm = update_norm(tensors)
    if norm <= clip_norm:
        return False
    scale_(tensors, clip_norm / norm)
    return True


@torch.no_grad()
def add_noise_(t: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Add N(0, std²) to every value of ``t`` in place, a slice at a time (no temporary
    the size of ``t``), drawn from ``generator`` on ``t``'s device."""
    for part in t.view(-1).split(CHUNK):
        noise = torch.randn(part.shape, generator=generator, device=t.device, dtype=t.dtype)
        part.add_(noise, alpha=std)


class ClientLevelDP:
    """The server's half of DP-FedAvg for a method that averages weight changes: clip
    each update as it is decoded, noise the round's mean before the server step.

    Used with :class:`~fedbits.robust.RobustAggregator`, which ``[privacy]`` sets to
    the uniform mean without a norm bound of its own (:meth:`~fedbits.config.
    PrivacySection.check_run`): clip after :meth:`~fedbits.robust.RobustAggregator.admit`
    (the update is on the server's device then), noise the outcome's changes."""

    def __init__(self, clip_norm: float, noise_multiplier: float, seed: int,
                 device: torch.device) -> None:
        self.clip_norm = clip_norm
        self.std = noise_multiplier * clip_norm  # σ, on the round's sum
        self.seed, self.device = seed, device  # the noise's key
        self.round: int | None = None
        self.clipped = 0  # this round's clipped updates

    @classmethod
    def of(cls, cfg: PrivacySection | None, seed: int,
           device: torch.device) -> ClientLevelDP | None:
        """The server's privacy step, or None where ``[privacy]`` is absent or inert
        (``clip_norm = "off"``, and so no noise): the run is then the plain one, bit for
        bit."""
        if cfg is None or isinstance(cfg.clip_norm, str):
            return None
        key = secrets.randbits(63) if cfg.noise_seed == "secret" else seed
        return cls(float(cfg.clip_norm), cfg.noise_multiplier, key, device)

    def clip(self, round_: int, delta: Mapping[str, torch.Tensor]) -> None:
        """Clip one decoded update (every tensor it sent) to ``clip_norm``, in place."""
        if self.round != round_:  # a new round (or one redone after a crash)
            self.round, self.clipped = round_, 0
        self.clipped += clip_(delta.values(), self.clip_norm)

    @torch.no_grad()
    def release_(self, round_: int, changes: dict[str, torch.Tensor],
                 received: Mapping[str, int], expected: Mapping[str, int],
                 like: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Turn the round's per-tensor means of clipped updates into DP-FedAvg's noised
        fixed-denominator means, in place: for each tensor, the mean over the
        ``received[name]`` updates that sent it becomes (their sum + N(0, σ²)) /
        ``expected[name]``, the clients the round's schedule gives that tensor (the
        cohort, or a block's share of it). A tensor the schedule gives clients but none
        of them sent still gets its noise (it is added to ``changes``): which tensors
        move must not tell who answered. Tensors go in ``like``'s order, so the draws
        are the same in every run of the seed. Returns the round's ``server_stats``."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(self.seed, "privacy-noise", round_))
        for name, p in like.items():
            k = expected.get(name, 0)
            if k == 0:
                continue
            n = received.get(name, 0)
            mean = changes.setdefault(name, torch.zeros_like(p, dtype=torch.float32))
            if n != k:
                mean.mul_(n / k)
            if self.std > 0:
                add_noise_(mean, self.std / k, generator)
        clipped = self.clipped if self.round == round_ else 0
        return {"dp_clipped": clipped} if clipped else {}

    def state_dict(self) -> dict[str, int]:
        """The noise's key: with ``noise_seed = "secret"`` nowhere else, so a resumed run
        draws the noise the uninterrupted one would have."""
        return {"key": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed = int(state["key"])


class Accountant:
    """The (ε, δ) the released models carry after each round: opacus' Rényi-DP analysis
    of the Poisson-subsampled Gaussian mechanism with noise multiplier z and sampling
    rate q, composed over the rounds. Every round is the same mechanism, so its Rényi
    divergence is computed once and t rounds are t times it (as opacus' own
    ``RDPAccountant`` composes them); ε after round t depends on nothing but t, and a
    resumed run reports what an uninterrupted one did."""

    def __init__(self, cfg: PrivacySection, cohort: int, population: int) -> None:
        # opacus loads only for a [privacy] run
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp

        self.delta = cfg.delta
        self.sample_rate = min(cohort, population) / population
        self.orders: list[float] = list(RDPAccountant.DEFAULT_ALPHAS)
        self._rdp = rdp
        self._per_round: Any = None
        if cfg.noise_multiplier > 0:  # which needs clip_norm
            self._per_round = rdp.compute_rdp(q=self.sample_rate,
                                              noise_multiplier=cfg.noise_multiplier,
                                              steps=1, orders=self.orders)

    def epsilon(self, rounds: int) -> float | None:
        """ε after ``rounds`` rounds at this δ; None where no noise is added (no finite ε:
        the round's model can reveal a client outright)."""
        if rounds == 0:
            return 0.0  # the initial model has seen no client's data
        if self._per_round is None:
            return None
        eps, _ = self._rdp.get_privacy_spent(orders=self.orders, rdp=self._per_round * rounds,
                                             delta=self.delta)
        return float(eps) if math.isfinite(eps) else None

    def row(self, rounds: int) -> dict[str, float | None]:
        """What a ``metrics.jsonl`` row reports after ``rounds`` rounds."""
        return {"dp_epsilon": self.epsilon(rounds), "dp_delta": self.delta}
