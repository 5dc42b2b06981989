"""Held-out loss on completion tokens, the metric every run reports every round.

The loss is token-weighted over the whole evaluation set (summed cross-entropy divided by
the number of scored tokens), not a mean of per-batch means, so it does not depend on the
batch size or on how long the sequences that share a batch happen to be.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedbits.data.batching import collate
from fedbits.data.format import IGNORE_INDEX, Tokenized
from fedbits.eval.common import inference, model_device
from fedbits.train import label_logits


def _batch_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed next-token cross-entropy over the batch's scored labels, and their count.

    Labels are aligned with ``input_ids`` (Hugging Face convention), so position ``t``'s
    logits predict label ``t + 1``; only positions that predict a label go through the
    LM head (:func:`~fedbits.train.label_logits`). Computed in float32 whatever the
    model's dtype.
    """
    logits, targets = label_logits(model, batch)
    logits = logits.float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll.item(), int((targets != IGNORE_INDEX).sum())


def eval_loss(
    model: torch.nn.Module,
    items: list[Tokenized],
    batch_size: int,
    pad_id: int,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, float]:
    """``eval_loss`` (mean CE per completion token), ``perplexity`` and ``eval_tokens``.

    The model is put in eval mode (no dropout, so the result is deterministic) and left in
    the mode it was in. With no scored tokens the loss is NaN rather than a made-up 0.
    """
    device = model_device(model)
    total, count = 0.0, 0
    with inference(model):
        for start in range(0, len(items), batch_size):
            batch = collate(items[start : start + batch_size], pad_id)
            nll, n = _batch_nll(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + nll, count + n
            if on_batch is not None:
                on_batch()
    loss = total / count if count else math.nan
    return {"eval_loss": loss, "perplexity": _perplexity(loss), "eval_tokens": count}


def _perplexity(loss: float) -> float:
    """exp(loss), infinite rather than an OverflowError for a diverged model."""
    return math.exp(loss) if loss < 700 else math.inf
