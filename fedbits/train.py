"""The client's local training loop: short enough to read in one screen."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedbits.config import ClientsSection
from fedbits.errors import ClientError
from fedbits.frozen import autocast, model_device

_HEAD_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config keys of architectures whose logits are not just ``lm_head(hidden)``."""


def _decoder_and_head(model: nn.Module) -> tuple[Any, nn.Module] | None:
    """The decoder stack and the LM head, when the logits are exactly ``head(hidden)``
    (Llama, Mistral, Qwen, GPT-2, ...; a PeftModel's LoRA layers sit inside the stack)."""
    base: Any = getattr(model, "get_base_model", lambda: model)()
    prefix = getattr(base, "base_model_prefix", "")
    decoder = getattr(base, prefix, None) if prefix else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    if decoder is None or decoder is base or not isinstance(head, nn.Module):
        return None
    if any(getattr(config, key, None) for key in _HEAD_CHANGES):
        return None
    return decoder, head


def label_logits(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` of the positions that predict a label, as ``[n, vocab]`` and
    ``[n]`` (Hugging Face alignment: position t predicts label t + 1).

    The decoder's hidden states are selected at those positions before the LM head, so
    the vocabulary logits of the prompts are never materialised: with a 49,152-token
    vocabulary they would be most of a step's activation memory. An architecture that
    post-processes its logits (soft-capping, scaling) computes them through its own
    forward, for the positions any row needs (``logits_to_keep``)."""
    from fedbits.data.format import IGNORE_INDEX  # fedbits.data imports datasets: not at import

    ids, mask = batch["input_ids"], batch["attention_mask"]
    target = batch["labels"][:, 1:]
    split = _decoder_and_head(model)
    if split is not None:
        decoder, head = split
        rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        return head(hidden[rows, cols]), target[rows, cols]
    keep = (target != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, keep]
    return logits.flatten(0, 1), target[:, keep].flatten()


def completion_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's scored labels (the completions):
    the model's own ``loss`` (same tokens, same mean) without the prompt's logits."""
    logits, targets = label_logits(model, batch)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


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


ParamState = dict[str, torch.Tensor]
"""One parameter's optimizer state as torch keeps it: AdamW's ``step``, ``exp_avg`` and
``exp_avg_sq``; SGD's ``momentum_buffer`` (none without momentum). Empty: not stepped yet."""


def make_optimizer(
    params: list[nn.Parameter], section: ClientsSection,
    states: Sequence[ParamState] | None = None,
) -> torch.optim.Optimizer:
    """A fresh client optimizer each round (FedAvg convention: no client optimizer state
    crosses rounds unless a method keeps it in its client store, or sends it, as
    FedCyBGD's ``cycle`` schedule does: then ``states`` holds, per parameter, the state
    it continues from, as :func:`optimizer_states` returned it)."""
    optimizer: torch.optim.Optimizer
    if section.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=section.lr, momentum=section.momentum, weight_decay=section.weight_decay
        )
    else:
        # foreach=False: the multi-tensor path holds temporaries the size of all the trained
        # tensors (a second model's worth for FedAvg); one tensor at a time costs no memory
        optimizer = torch.optim.AdamW(params, lr=section.lr, weight_decay=section.weight_decay,
                                      foreach=False)
    if states is not None:
        if len(states) != len(params):
            raise ValueError(f"{len(states)} optimizer states for {len(params)} parameters")
        for p, state in zip(params, states, strict=True):
            if state:  # an empty state is a parameter not stepped yet: torch initialises it
                optimizer.state[p] = dict(state)
    return optimizer


def optimizer_states(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
) -> list[ParamState]:
    """Per parameter, the optimizer's tensors (what :func:`make_optimizer` continues from)."""
    return [{k: v for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
            for p in params]


class StepInBackward:
    """One optimizer per trained tensor, each stepped by a hook the moment backward has
    finished that tensor's gradient, which is then freed (torchtune's ``optimizer_in_bwd``).

    Training then holds one tensor's gradient at a time instead of one per trained
    tensor: a whole model's worth for FedAvg, 4 GB at 1B parameters. The arithmetic is
    that of one optimizer over all of them, bit for bit: :func:`make_optimizer`'s
    optimizers step each tensor on its own anyway (``foreach=False``). Nothing in the
    loop may need every gradient at once (no global-norm clipping, no accumulation).

    ``states``: as for :func:`make_optimizer`; :meth:`states` reads them back before the
    block ends (leaving it frees the optimizers and their state)."""

    def __init__(self, params: list[nn.Parameter], section: ClientsSection,
                 states: Sequence[ParamState] | None = None) -> None:
        if states is not None and len(states) != len(params):
            raise ValueError(f"{len(states)} optimizer states for {len(params)} parameters")
        self._params = params
        self._optimizers = [make_optimizer([p], section, None if states is None else [states[i]])
                            for i, p in enumerate(params)]
        self._hooks = [p.register_post_accumulate_grad_hook(_step_and_free(opt))
                       for p, opt in zip(params, self._optimizers, strict=True)]

    def states(self) -> list[ParamState]:
        """Per parameter, its optimizer's state (see :func:`optimizer_states`)."""
        return [optimizer_states(opt, [p])[0]
                for p, opt in zip(self._params, self._optimizers, strict=True)]

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:  # the hooks hold the optimizers and their state
            hook.remove()
        self._hooks, self._optimizers = [], []


def _step_and_free(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        optimizer.step()
        param.grad = None

    return hook


def local_train(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
    progress=None,
    after_step: Callable[[], None] | None = None,
) -> float:
    """Run one optimizer step per batch; return the mean training loss.

    ``optimizer``: stepped after each backward pass; None when the trained tensors step
    themselves during it (:class:`StepInBackward`). ``after_step`` runs after every
    step (e.g. to keep a sparsity mask).

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
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        total += loss.item()
        steps += 1
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    return total / max(steps, 1)
