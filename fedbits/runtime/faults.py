"""The simulator's fault injection (``[faults]``): clients that drop out, run late, crash
or attack, so that a defence can be measured on a method (docs/faults.md).

Every decision is a pure function of (``run.seed``, round, client), each fault from a
seed of its own (:func:`~fedbits.seeding.derive_seed`): a run with faults is
bit-reproducible, a resumed one continues exactly, and changing one rate does not
reshuffle the others. The malicious clients are one set fixed for the whole run (an
attacker owns devices, not rounds); which attack a malicious client makes is drawn
per round when ``faults.attack`` lists several.

The simulator asks :meth:`FaultPlan.plan` what a sampled client does, answers for a
client that does not reply, hands the rest to the method through
:attr:`ClientData.injected <fedbits.methods.base.ClientData.injected>`, and records
what happened in :class:`RoundFaults` (the round's ``faults`` in ``metrics.jsonl``).
Nothing sleeps: a straggler's time is simulated seconds, recorded, never waited for.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from fedbits.config import Config, FaultsSection
from fedbits.methods import ClientData, ClientResult, ClientSide, ClientStore
from fedbits.methods.injected import Injected
from fedbits.seeding import derive_seed
from fedbits.wire import Body

logger = logging.getLogger(__name__)


def malicious_clients(faults: FaultsSection, seed: int, num_clients: int) -> list[int]:
    """The run's malicious clients: ``malicious_fraction`` of all clients, rounded, at
    least one when the fraction is above 0, drawn once from the run seed."""
    if faults.malicious_fraction == 0:
        return []
    count = min(num_clients, max(1, round(faults.malicious_fraction * num_clients)))
    rng = random.Random(derive_seed(seed, "faults", "malicious"))
    return sorted(rng.sample(range(num_clients), count))


@dataclass
class ClientFault:
    """What one sampled client does in one round."""

    missing: str = ""  # why no reply comes (dropped out, or past the deadline); "" if one does
    late: bool = False  # no reply because it missed the deadline
    seconds: float | None = None  # a slow client's simulated time
    injected: Injected = field(default_factory=Injected)  # what goes wrong in its update


class FaultPlan:
    """Which client does what, from ``cfg.faults``, ``run.seed``, the round and the client."""

    def __init__(self, cfg: Config) -> None:
        assert cfg.faults is not None  # the simulator builds a plan only for a [faults] run
        self.faults = cfg.faults
        self.seed = cfg.run.seed
        self.local_steps = cfg.clients.local_steps
        self.malicious = frozenset(malicious_clients(self.faults, self.seed,
                                                     cfg.data.num_clients))
        logger.info("faults: %s; malicious clients: %s", self._describe(),
                    ", ".join(map(str, sorted(self.malicious))) or "none")

    def _describe(self) -> str:
        f = self.faults
        parts = [f"dropout {f.dropout:g}", f"crash {f.crash:g}",
                 f"stragglers {f.straggler_fraction:g} (mean delay {f.straggler_delay_s:g} s, "
                 f"deadline {'none' if f.deadline_s is None else f'{f.deadline_s:g} s'})"]
        if self.malicious:
            parts.append(f"attack {'/'.join(f.attack)} (scale {f.attack_scale:g})")
        return ", ".join(parts)

    def new_round(self) -> RoundFaults:
        """An empty record for the next round's faults."""
        return RoundFaults(self.faults.deadline_s, self.faults.client_seconds)

    def _rng(self, fault: str, round_: int, client: int) -> random.Random:
        return random.Random(derive_seed(self.seed, "faults", fault, round_, client))

    def plan(self, round_: int, client: int) -> ClientFault:
        """What ``client`` does in ``round_``: the same answer every time it is asked."""
        f = self.faults
        out = ClientFault()
        if self._rng("dropout", round_, client).random() < f.dropout:
            out.missing = "no reply: the client dropped out (injected by faults.dropout)"
        slow = self._rng("straggler", round_, client)
        if slow.random() < f.straggler_fraction:
            out.seconds = f.client_seconds + slow.expovariate(1 / f.straggler_delay_s)
            if not out.missing and f.deadline_s is not None and out.seconds > f.deadline_s:
                out.late = True
                out.missing = (f"no reply by the deadline: simulated {out.seconds:.1f} s > "
                               f"faults.deadline_s={f.deadline_s:g} s (injected straggler)")
        crash = self._rng("crash", round_, client)
        if crash.random() < f.crash:
            out.injected.crash_after = crash.randint(1, self.local_steps)
        if client in self.malicious:
            attacks = f.attack
            out.injected.attack = attacks[self._rng("attack", round_, client)
                                          .randrange(len(attacks))]
            out.injected.attack_scale = f.attack_scale
        return out


@dataclass
class RoundFaults:
    """What the faults did in one round, as ``metrics.jsonl`` records it.

    ``slow`` holds every straggler's simulated seconds, ``late`` those that missed the
    deadline (also rejected, as ``dropped`` are); ``crashed`` and ``attacked`` only
    the clients whose update the fault struck (an attack on a client that crashed
    first, or on a method whose half does not apply it, did not happen)."""

    deadline_s: float | None
    client_seconds: float
    dropped: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    slow: dict[str, float] = field(default_factory=dict)
    crashed: list[int] = field(default_factory=list)
    attacked: dict[str, str] = field(default_factory=dict)
    replied: list[float] = field(default_factory=list)  # simulated seconds of each reply

    def record(self, client: int, fault: ClientFault, answered: bool) -> None:
        """Book ``client``'s fault; ``answered``: an uplink came back from it."""
        if fault.seconds is not None:
            self.slow[str(client)] = round(fault.seconds, 3)
        if fault.missing:
            (self.late if fault.late else self.dropped).append(client)
            return
        applied = fault.injected.applied
        if "crash" in applied:
            self.crashed.append(client)
            return
        attacks = [a for a in applied if a != "crash"]
        if attacks:
            self.attacked[str(client)] = attacks[0]
        if answered:
            self.replied.append(self.client_seconds if fault.seconds is None else fault.seconds)

    def as_row(self) -> dict[str, Any]:
        """The round's ``faults`` entry; ``simulated_seconds`` is the round's simulated
        length: its slowest reply, or the deadline when a client missed it."""
        waited = self.deadline_s if self.late else max(self.replied, default=0.0)
        return {
            "dropped": self.dropped, "late": self.late, "slow": self.slow,
            "crashed": self.crashed, "attacked": self.attacked,
            "simulated_seconds": round(waited or 0.0, 3),
        }


class RandomBytes:
    """A client half whose uplink body, under the ``random_bytes`` attack, is replaced by
    seeded random bytes of the same length. The runtime seals it as any body, so the
    server's own decoder is what meets them."""

    def __init__(self, half: ClientSide) -> None:
        self.half = half

    def update(
        self, round_: int, client: int, downlink: Body, data: ClientData, store: ClientStore
    ) -> ClientResult:
        result = self.half.update(round_, client, downlink, data, store)
        if data.injected.attack == "random_bytes" and isinstance(result, ClientResult):
            rng = random.Random(derive_seed(data.seed, "faults", "random_bytes"))
            result.body = rng.randbytes(len(result.body))
            data.injected.applied.append("random_bytes")
        return result
