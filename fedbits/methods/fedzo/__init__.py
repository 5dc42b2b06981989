"""FedZO (Fang et al., 2022): federated zeroth-order optimisation with dense updates.

Each client takes τ local zeroth-order steps, each an average of ``num_directions``
two-point estimates along seeded random directions, and uploads its dense model
change; the server averages the changes as FedAvg does and every client downloads the
dense model. It is FedKSeed's baseline: the same local optimiser, with FedAvg's bytes
(the whole model both ways) instead of a few kilobytes of seed scalars.

The server half is FedAvg's (:class:`~fedbits.methods._dense.DenseServer`): the
wire, the ``[robust]`` aggregator, ``[privacy]`` and the server optimizer are shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbits.methods.base import MethodContext, MethodSpec
from fedbits.methods.fedzo.options import FedZOOptions, prepare
from fedbits.methods.registry import register

if TYPE_CHECKING:
    from fedbits.methods._dense import DenseServer
    from fedbits.methods.fedzo.client import FedZOClient


# The halves import the zeroth-order engine and the data batching: only a run does.
def _server(ctx: MethodContext) -> DenseServer:
    from fedbits.methods._dense import DenseServer

    return DenseServer(ctx, prepare)


def _client(ctx: MethodContext) -> FedZOClient:
    from fedbits.methods.fedzo.client import FedZOClient

    return FedZOClient(ctx)


register(
    MethodSpec(
        name="fedzo",
        options=FedZOOptions,
        server=_server,
        client=_client,
        summary="zeroth-order local steps, dense model change up and dense model down",
    )
)
