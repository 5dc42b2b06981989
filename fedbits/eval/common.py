"""Helpers shared by the loss and generation evaluations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedbits.frozen import autocast, model_device

__all__ = ["inference", "model_device"]


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, so results are repeatable), no autograd and the model's
    autocast (a low-precision base under float32 trained weights), with the model's
    previous train/eval mode restored afterwards: evaluation runs between training steps."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(model):
            yield
    finally:
        model.train(was_training)
