"""FedAvg: full-parameter training, dense deltas both ways.

The quality reference and the cost ceiling: every trainable weight goes down and
its change comes up, every round.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from fedbits.config import Config
from fedbits.methods._dense import DenseClient, DenseOptions, DenseServer
from fedbits.methods.base import MethodSpec, refuse_float16_adamw
from fedbits.methods.registry import register


class FedAvgOptions(DenseOptions):
    privacy_refusal: ClassVar[str | None] = None  # DenseServer clips and noises

    def check_config(self, cfg: Config) -> None:
        refuse_float16_adamw(cfg, "every weight of the model")


def _prepare(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


register(
    MethodSpec(
        name="fedavg",
        options=FedAvgOptions,
        server=lambda ctx: DenseServer(ctx, _prepare),
        client=lambda ctx: DenseClient(ctx, _prepare),
        summary="full-parameter FedAvg, dense deltas both ways",
    )
)
