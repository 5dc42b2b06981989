"""The client's local training loop: short enough to read in one screen."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fedbits.config import ClientsSection
from fedbits.errors import ClientError


def make_optimizer(params: list[nn.Parameter], section: ClientsSection) -> torch.optim.Optimizer:
    """A fresh client optimizer each round (FedAvg convention: no client optimizer state
    crosses rounds unless a method keeps it in its client store)."""
    if section.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=section.lr, momentum=section.momentum, weight_decay=section.weight_decay
        )
    return torch.optim.AdamW(params, lr=section.lr, weight_decay=section.weight_decay)


def local_train(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    progress=None,
    after_step: Callable[[], None] | None = None,
) -> float:
    """Run one optimizer step per batch; return the mean training loss.

    ``after_step`` runs after every optimizer step (e.g. to keep a sparsity mask).

    A non-finite loss stops the client: its update would poison the aggregate,
    so the runtime rejects it and the round goes on without it.
    """
    was_training = model.training
    model.train()
    total, steps = 0.0, 0
    for batch in batches:
        loss = model(**batch).loss
        if not math.isfinite(loss.item()):
            raise ClientError(f"non-finite training loss at local step {steps + 1}")
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item()
        steps += 1
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    return total / max(steps, 1)
