"""Server-side update rules applied to the aggregated pseudo-gradient.

The aggregate client change Δ (sample-weighted mean of client deltas) is turned into
a pseudo-gradient g = −Δ and handed to a torch optimizer over the global trainable
tensors: plain averaging is SGD with lr 1 (w ← w + Δ, exactly FedAvg); FedAdam is
Adam (Reddi et al. 2021) with no weight decay. Using torch optimizers means their
state checkpoints with ``state_dict`` and resumes bit-exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

ServerOptName = Literal["avg", "fedadam"]


class ServerOptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_opt: ServerOptName = "avg"
    server_lr: float = Field(1.0, gt=0)
    server_beta1: float = Field(0.9, ge=0, lt=1)
    server_beta2: float = Field(0.99, ge=0, lt=1)
    server_eps: float = Field(1e-3, gt=0, description="FedAdam's tau (adaptivity)")


def make_server_optimizer(
    params: list[torch.Tensor], opts: ServerOptOptions
) -> torch.optim.Optimizer:
    if opts.server_opt == "avg":
        return torch.optim.SGD(params, lr=opts.server_lr)
    return torch.optim.Adam(
        params,
        lr=opts.server_lr,
        betas=(opts.server_beta1, opts.server_beta2),
        eps=opts.server_eps,
        weight_decay=0.0,
    )


@torch.no_grad()
def apply_pseudo_gradient(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], deltas: list[torch.Tensor]
) -> None:
    for p, d in zip(params, deltas):
        p.grad = (-d).to(p.dtype)
    optimizer.step()
    for p in params:
        p.grad = None
