"""FedAvg: full-parameter training, dense deltas both ways.

The quality reference and the cost ceiling: every trainable weight goes down and
its change comes up, every round.
"""

from __future__ import annotations

from torch import nn

from fedbits.methods import MethodSpec, register
from fedbits.methods._dense import DenseClient, DenseOptions, DenseServer


class FedAvgOptions(DenseOptions):
    pass


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
