"""FedKSeed and FedKSeed-Pro (Qin et al., ICML 2024): full-parameter federated tuning
where a client sends a few hundred bytes and receives a few kilobytes per round.

Clients take zeroth-order steps along directions generated from a pool of K seeds and
report one scalar per step; the server accumulates the scalars per seed; every node
rebuilds the model from its base weights by exact replay (:mod:`fedbits.zo`).
Pro samples seeds by their importance (mean |scalar| so far), which the server sends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbits.methods.base import MethodContext, MethodSpec
from fedbits.methods.fedkseed.options import PAPER_CLIENTS, FedKSeedOptions, FedKSeedProOptions
from fedbits.methods.registry import register

if TYPE_CHECKING:
    from fedbits.methods.fedkseed.client import FedKSeedClient
    from fedbits.methods.fedkseed.server import FedKSeedServer


# The halves import the zeroth-order engine (and through it transformers): only a run does.
def _server(ctx: MethodContext, pro: bool = False) -> FedKSeedServer:
    from fedbits.methods.fedkseed.server import FedKSeedServer

    return FedKSeedServer(ctx, pro=pro)


def _client(ctx: MethodContext, pro: bool = False) -> FedKSeedClient:
    from fedbits.methods.fedkseed.client import FedKSeedClient

    return FedKSeedClient(ctx, pro=pro)


register(
    MethodSpec(
        name="fedkseed",
        options=FedKSeedOptions,
        server=_server,
        client=_client,
        summary="zeroth-order full-parameter tuning over K shared seeds (kilobytes per round)",
        client_defaults=PAPER_CLIENTS,
    )
)
register(
    MethodSpec(
        name="fedkseed-pro",
        options=FedKSeedProOptions,
        server=lambda ctx: _server(ctx, pro=True),
        client=lambda ctx: _client(ctx, pro=True),
        summary="FedKSeed with seeds sampled by importance (probabilities sent down)",
        client_defaults=PAPER_CLIENTS,
    )
)
