"""Optimizer state that travels with a block (FedCyBGD's ``cycle`` schedule).

When clients train a block one after another, the reference code's optimizer keeps
its moments across them: the next client continues the previous one's AdamW run
rather than restarting its bias correction from step 0. In fedbits nothing is shared
between clients but bytes, so the state goes down with the block and comes back up
with its change, and the server keeps it (and checkpoints it) between clients.

On the wire, after the block's weights (down) or before its change (up)::

    step u32 | per moment (AdamW: exp_avg, exp_avg_sq; SGD with momentum:
               momentum_buffer; SGD without: none): float32 tensor of the block's numel

``step`` is the number of optimizer steps the block has taken over the run. A block
never trained has step 0 and no moments: the optimizer starts fresh, exactly as
torch initialises it (AdamW's zero moments; SGD's first momentum buffer is the first
gradient, which zeros would not reproduce). The values are exact float32, never a
lossy chain: a rounded second moment would change every later step.

A received state is hostile input: :func:`read_state` checks the count and dtype of
every tensor before allocating, that the values are finite, a second moment is not
negative and each first moment within what AdamW can reach from its second moment
(|m| ≤ 7.27·sqrt(v)), and the caller checks the step against the one it expects. An
SGD momentum buffer has no such bound: its size is the gradients', so only the robust
bound on the next client's change limits a hostile one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedbits.config import ClientsSection
from fedbits.errors import WireError
from fedbits.train import ParamState
from fedbits.wire import Layout, Reader, Writer


def moment_names(clients: ClientsSection) -> tuple[str, ...]:
    """The per-parameter tensors ``clients.optimizer`` keeps, in wire order."""
    if clients.optimizer == "adamw":
        return ("exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if clients.momentum else ()


@dataclass
class BlockState:
    """A block's optimizer state: its step count and, per moment, the block's values
    as one flat float32 tensor in the layout's order (empty when ``step`` is 0)."""

    step: int = 0
    moments: dict[str, torch.Tensor] = field(default_factory=dict)

    def write(self, w: Writer, names: tuple[str, ...]) -> None:
        w.u32(self.step)
        if self.step > 0:
            for name in names:
                w.tensor(self.moments[name])

    def per_param(self, layout: Layout, clients: ClientsSection,
                  device: torch.device) -> dict[str, ParamState]:
        """What :func:`fedbits.train.make_optimizer` continues from, by parameter name."""
        if self.step == 0:
            return {}
        out: dict[str, ParamState] = {n: {} for n in layout.names}
        for moment, flat in self.moments.items():
            for name, value in layout.unflatten(flat).items():
                out[name][moment] = value.to(device).clone()
        if clients.optimizer == "adamw":  # torch keeps the step per parameter, as float32
            for state in out.values():
                state["step"] = torch.tensor(float(self.step), dtype=torch.float32)
        return out

    @classmethod
    def of_params(cls, states: Mapping[str, ParamState], layout: Layout, step: int,
                  names: tuple[str, ...]) -> BlockState:
        """The state training ended with (:attr:`fedbits.methods._updates.LocalChange.
        optimizer_state`), after ``step`` steps in all."""
        for name, state in states.items():
            if "step" in state and int(state["step"].item()) != step:
                raise RuntimeError(f"the optimizer of {name} took {state['step'].item():g} "
                                   f"steps, expected {step}")
        moments = {m: layout.flatten({n: states[n][m] for n in layout.names}, torch.float32)
                   .cpu() for m in names}
        return cls(step, moments)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64),
                **{m: t.clone() for m, t in self.moments.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> BlockState:
        return cls(int(state["step"]), {m: t.clone() for m, t in state.items() if m != "step"})


def read_state(r: Reader, names: tuple[str, ...], numel: int) -> BlockState:
    """What :meth:`BlockState.write` wrote, checked as hostile input."""
    step = r.u32("optimizer.step")
    if step == 0:
        return BlockState()
    moments: dict[str, torch.Tensor] = {}
    for name in names:
        value = r.tensor(f"optimizer.{name}", count=numel, dtype=torch.float32)
        if not torch.isfinite(value).all():
            raise WireError(f"{r.what}: field optimizer.{name}: non-finite value")
        if name == "exp_avg_sq" and (value < 0).any():
            raise WireError(f"{r.what}: field optimizer.{name}: a second moment is negative")
        moments[name] = value
    if "exp_avg" in moments and "exp_avg_sq" in moments:
        _check_adam_ratio(r, moments["exp_avg"], moments["exp_avg_sq"])
    return BlockState(step, moments)


_ADAM_BETAS = (0.9, 0.999)  # torch's AdamW defaults, which fedbits.train uses
_ADAM_RATIO = ((1 - _ADAM_BETAS[0]) / (1 - _ADAM_BETAS[1]) ** 0.5
               / (1 - _ADAM_BETAS[0] ** 2 / _ADAM_BETAS[1]) ** 0.5)
"""The largest |exp_avg| / sqrt(exp_avg_sq) any AdamW run from zero moments reaches
(Cauchy-Schwarz on the two exponential sums: (1-β1)/sqrt(1-β2)/sqrt(1-β1²/β2) ≈ 7.27);
a weighted mean of such states (``agg_clients``) stays within it by Jensen."""


def _check_adam_ratio(r: Reader, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    """Refuse moments no AdamW run can produce. A first moment far above its second
    moment's root would make the next client's every step huge (AdamW's step is
    lr·m̂/(sqrt(v̂)+eps)), so a bound on the change alone would not hold the block.
    The slack covers float32 rounding and gradients whose squares underflow."""
    limit = exp_avg_sq.double().sqrt_().mul_(_ADAM_RATIO * 1.01).add_(1e-18)
    if (exp_avg.double().abs() > limit).any():
        raise WireError(f"{r.what}: field optimizer.exp_avg: a first moment beyond "
                        f"{_ADAM_RATIO:.2f}·sqrt(second moment), which no AdamW run reaches")


def mean_state(states: list[tuple[BlockState, float]]) -> BlockState:
    """The weighted mean of the states of clients that trained one block together
    (``agg_clients`` > 1; they started from the same state, so their steps agree); one
    state is returned as it is, bit for bit."""
    if len(states) == 1:
        return states[0][0]
    total = sum(w for _, w in states)
    first = states[0][0]
    moments = {m: sum((s.moments[m].double() * w for s, w in states),
                      torch.zeros_like(first.moments[m], dtype=torch.float64))
               .div_(total).float() for m in first.moments}
    return BlockState(first.step, moments)
