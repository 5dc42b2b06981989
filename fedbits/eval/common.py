"""Helpers shared by the loss and generation evaluations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, so results are repeatable) and no autograd, with the model's
    previous train/eval mode restored afterwards: evaluation runs between training steps."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
