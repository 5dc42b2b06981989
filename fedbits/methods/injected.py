"""Faults the simulator injects into a client half, applied where every method shares a path.

The runtime decides which client misbehaves in a round and how (``[faults]``,
:mod:`fedbits.runtime.faults`, docs/faults.md) and hands it over as
:attr:`ClientData.injected <fedbits.methods.base.ClientData.injected>`. A method never
chooses a fault; its client half meets one only in code it shares with the others:

- the sample count it reports (:attr:`~fedbits.methods.base.ClientData.claimed_samples`:
  the ``weight`` attack claims 2³²−1);
- its local steps (:meth:`Injected.crash_hook` for :func:`~fedbits.methods._updates.train_change`,
  :meth:`Injected.step_done` for a loop of its own, as FedKSeed's): the ``crash`` fault
  raises after the drawn step;
- what it computed (:meth:`Injected.tamper` on a change, :meth:`Injected.tamper_scalar`
  on FedKSeed's scalars): the value attacks ``scale``, ``nan``, ``huge``, ``sign_flip``.

``random_bytes`` replaces the finished body and needs no method's help (the simulator
does it). What a half applied is noted in :attr:`Injected.applied`, so the runtime
records an attack only where it happened: a plugin method whose half does not go
through these paths is reported as not attacked, never silently counted as attacked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedbits.errors import ClientError

VALUE_ATTACKS = frozenset({"scale", "nan", "huge", "sign_flip"})
"""The attacks on values a client computed (the change, or FedKSeed's scalars)."""
HUGE = 3e38
"""The ``huge`` attack's value: finite in float32 and bfloat16, near their largest."""
CLAIMED_SAMPLES = 2**32 - 1
"""The ``weight`` attack's sample count: the largest a u32 field can carry."""


@dataclass
class Injected:
    """What this client does wrong this round (nothing, by default)."""

    crash_after: int | None = None  # raise once this many local steps are done
    attack: str | None = None  # one of fedbits.config.ATTACKS
    attack_scale: float = 1.0  # the factor of the "scale" attack
    applied: list[str] = field(default_factory=list)  # what the half went through with

    def claimed(self, num_samples: int) -> int:
        """The sample count the client reports for ``num_samples`` examples."""
        if self.attack != "weight":
            return num_samples
        self.applied.append("weight")
        return CLAIMED_SAMPLES

    def step_done(self, steps: int) -> None:
        """Call after each local step, ``steps`` done so far: the crash strikes here."""
        if steps == self.crash_after:
            self.applied.append("crash")
            raise ClientError(f"crashed after {steps} local steps (injected by faults.crash)")

    def crash_hook(
        self, after_step: Callable[[], None] | None
    ) -> Callable[[], None] | None:
        """``after_step`` (a training loop's per-step hook), followed by
        :meth:`step_done`; unchanged when no crash is planned."""
        if self.crash_after is None:
            return after_step
        steps = 0

        def step() -> None:
            nonlocal steps
            if after_step is not None:
                after_step()
            steps += 1
            self.step_done(steps)

        return step

    @torch.no_grad()
    def tamper(self, values: torch.Tensor) -> None:
        """Apply a value attack to ``values`` (one tensor of a change) in place."""
        if self.attack not in VALUE_ATTACKS:
            return
        if self.attack == "scale":
            values.mul_(self.attack_scale)
        elif self.attack == "sign_flip":
            values.neg_()
        else:
            values.fill_(float("nan") if self.attack == "nan" else HUGE)
        self._note()

    def tamper_scalar(self, value: float) -> float:
        """A value attack on one scalar the client computed."""
        if self.attack not in VALUE_ATTACKS:
            return value
        self._note()
        if self.attack == "scale":
            return value * self.attack_scale
        if self.attack == "sign_flip":
            return -value
        return float("nan") if self.attack == "nan" else HUGE

    def _note(self) -> None:
        assert self.attack is not None  # the callers checked
        if self.attack not in self.applied:
            self.applied.append(self.attack)
