"""FedKSeed and FedKSeed-Pro (Qin et al., ICML 2024): full-parameter federated tuning
where a client sends a few hundred bytes and receives a few kilobytes per round.

Clients take zeroth-order steps along directions generated from a pool of K seeds and
report one scalar per step; the server accumulates the scalars per seed; every node
rebuilds the model from its base weights by exact replay (:mod:`fedbits.zo`).
Pro samples seeds by their importance (mean |scalar| so far), which the server sends.
"""

from fedbits.methods import MethodSpec, register
from fedbits.methods.fedkseed.client import FedKSeedClient
from fedbits.methods.fedkseed.options import FedKSeedOptions, FedKSeedProOptions
from fedbits.methods.fedkseed.server import FedKSeedServer

register(
    MethodSpec(
        name="fedkseed",
        options=FedKSeedOptions,
        server=FedKSeedServer,
        client=FedKSeedClient,
        summary="zeroth-order full-parameter tuning over K shared seeds (kilobytes per round)",
    )
)
register(
    MethodSpec(
        name="fedkseed-pro",
        options=FedKSeedProOptions,
        server=lambda ctx: FedKSeedServer(ctx, pro=True),
        client=lambda ctx: FedKSeedClient(ctx, pro=True),
        summary="FedKSeed with seeds sampled by importance (probabilities sent down)",
    )
)
