"""FedZO's ``[method]`` options: FedAvg's wire and server options plus the estimator's."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from fedbits.methods._dense import DenseOptions


class FedZOOptions(DenseOptions):
    privacy_refusal: ClassVar[str | None] = None  # DenseServer clips and noises the changes
    num_directions: int = Field(
        1, ge=1, le=1024, description="b2: two-point estimates per local step, each along "
        "its own random direction at the same weights, averaged into one update"
    )
    eps: float = Field(1e-3, gt=0, description="perturbation scale ε of the two-point estimate")
    distribution: Literal["gaussian", "rademacher"] = Field(
        "gaussian", description="direction values: 4096-level Gaussian, or ±1"
    )


def prepare(model: nn.Module) -> nn.Module:
    """Every weight is trained (and so sent both ways), as in FedAvg."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model
