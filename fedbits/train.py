"""The client's local training loop: short enough to read in one screen."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedbits.config import ClientsSection
from fedbits.errors import ClientError
from fedbits.frozen import autocast, model_device


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can compute logits at chosen positions only (every
    Hugging Face causal LM of recent transformers; a PeftModel passes it through)."""
    base = getattr(model, "get_base_model", lambda: model)()
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def label_logits(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the positions that predict some row's label, and those labels.

    Only those positions go through the LM head (``logits_to_keep``), so the vocabulary
    logits of the prompt are never materialised: with a 49,152-token vocabulary they
    are most of a step's activation memory."""
    from fedbits.data.format import IGNORE_INDEX  # fedbits.data imports datasets: not at import

    labels = batch["labels"]
    keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "use_cache": False}
    if _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, keep]
    return logits, labels[:, keep + 1]


def completion_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's scored labels (the completions):
    the model's own ``loss`` (same tokens, same mean) without the prompt's logits."""
    logits, targets = label_logits(model, batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant, so it
    needs no gradient on the inputs and works with frozen embeddings and LoRA)."""
    base: Any = getattr(model, "get_base_model", lambda: model)()
    if not getattr(base, "supports_gradient_checkpointing", False):
        if enabled:
            raise ClientError(f"{type(base).__name__} does not support gradient checkpointing")
        return
    if enabled:
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    elif base.is_activation_checkpointing:
        base.activation_checkpointing_disable()


def make_optimizer(params: list[nn.Parameter], section: ClientsSection) -> torch.optim.Optimizer:
    """A fresh client optimizer each round (FedAvg convention: no client optimizer state
    crosses rounds unless a method keeps it in its client store)."""
    if section.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=section.lr, momentum=section.momentum, weight_decay=section.weight_decay
        )
    # foreach=False: the multi-tensor path holds temporaries the size of all the trained
    # tensors (a second model's worth for FedAvg); one tensor at a time costs no memory
    return torch.optim.AdamW(params, lr=section.lr, weight_decay=section.weight_decay,
                             foreach=False)


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
    device = model_device(model)
    total, steps = 0.0, 0
    for batch in batches:
        with autocast(model):
            loss = completion_loss(model, {k: v.to(device) for k, v in batch.items()})
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
