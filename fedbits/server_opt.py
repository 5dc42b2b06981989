"""Server-side update rules applied to the aggregated pseudo-gradient.

The aggregate client change Δ (sample-weighted mean of client deltas) is turned into
a pseudo-gradient g = −Δ and handed to a torch optimizer over the global trainable
tensors: plain averaging is SGD with lr 1 (w ← w + Δ, exactly FedAvg); FedAvgM is
SGD with momentum β1 (Hsu et al. 2019); FedAdam is torch's Adam with no weight decay;
FedYogi and FedAdagrad follow Reddi et al. 2021, Algorithm 2, exactly (no bias
correction, v starts at τ², τ = ``server_eps``), which torch does not ship, so
:class:`ReddiAdaptive` implements them as a torch optimizer. Every rule keeps its
state in the optimizer's ``state_dict``, so it checkpoints and resumes bit-exactly.

A tensor whose ``.grad`` is None in a round is skipped by every rule (no step, no
state update): methods that train part of the model hand over only what some client
changed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

ServerOptName = Literal["avg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]


class ServerOptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_opt: ServerOptName = "avg"
    server_lr: float = Field(1.0, gt=0)
    server_beta1: float = Field(
        0.9, ge=0, lt=1,
        description="FedAvgM's momentum; the first-moment decay of the adaptive rules",
    )
    server_beta2: float = Field(0.99, ge=0, lt=1)
    server_eps: float = Field(1e-3, gt=0, description="the adaptive rules' tau (adaptivity)")


class ReddiAdaptive(torch.optim.Optimizer):
    """FedYogi / FedAdagrad (Reddi et al. 2021, Alg. 2) on the pseudo-gradient g = −Δ::

        m ← β1·m + (1 − β1)·g
        v ← v + g²                              (adagrad)
        v ← v − (1 − β2)·g²·sign(v − g²)        (yogi)
        w ← w − lr · m / (√v + τ)

    with m = 0 and v = τ² at the first step of each tensor.
    """

    def __init__(
        self, params, lr: float, betas: tuple[float, float], eps: float,
        rule: Literal["yogi", "adagrad"],
    ) -> None:
        if rule not in ("yogi", "adagrad"):
            raise ValueError(f"unknown adaptive rule {rule!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "rule": rule})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            tau = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, tau * tau)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                if group["rule"] == "adagrad":
                    v.add_(g2)
                else:
                    v.sub_(torch.sign(v - g2).mul_(g2), alpha=1 - beta2)
                p.addcdiv_(m, v.sqrt().add_(tau), value=-group["lr"])
        return None


def make_server_optimizer(
    params: list[torch.Tensor], opts: ServerOptOptions
) -> torch.optim.Optimizer:
    betas = (opts.server_beta1, opts.server_beta2)
    if opts.server_opt == "avg":
        return torch.optim.SGD(params, lr=opts.server_lr)
    if opts.server_opt == "fedavgm":
        return torch.optim.SGD(params, lr=opts.server_lr, momentum=opts.server_beta1)
    if opts.server_opt == "fedadam":
        return torch.optim.Adam(params, lr=opts.server_lr, betas=betas, eps=opts.server_eps,
                                weight_decay=0.0)
    rule: Literal["yogi", "adagrad"] = "yogi" if opts.server_opt == "fedyogi" else "adagrad"
    return ReddiAdaptive(params, lr=opts.server_lr, betas=betas, eps=opts.server_eps, rule=rule)


@torch.no_grad()
def apply_pseudo_gradient(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], deltas: list[torch.Tensor]
) -> None:
    """One server step on ``params`` only; tensors of the optimizer not listed are left as
    they are (their ``.grad`` is None)."""
    for p, d in zip(params, deltas, strict=True):
        p.grad = (-d).to(p.dtype)
    optimizer.step()
    for p in params:
        p.grad = None
