"""CG-FedLLM (Wu et al., arXiv 2405.13746): federated LoRA whose uplink is the latent of
a convolutional autoencoder trained on the clients' own updates.

TGAP, the first ``tgap_fraction`` of the rounds, is plain federated LoRA (fedit) while
the server keeps a temporal ensemble of the updates; then it trains the autoencoder
(the ``autoencoder`` codec stage), every client downloads it once per version, and in
FAF, the remaining rounds, clients send its latent (1/64 of the update by default)
with the reconstruction they measured, checked against occasional dense audit
uploads. docs/cgfedllm.md has the protocol, its costs and what it measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbits.methods.base import MethodContext, MethodSpec
from fedbits.methods.cgfedllm.options import CGFedLLMOptions
from fedbits.methods.registry import register

if TYPE_CHECKING:
    from fedbits.methods.cgfedllm.client import CGFedLLMClient
    from fedbits.methods.cgfedllm.server import CGFedLLMServer


# The halves build peft models: imported when a run builds them, not to list methods.
def _server(ctx: MethodContext) -> CGFedLLMServer:
    from fedbits.methods.cgfedllm.server import CGFedLLMServer

    return CGFedLLMServer(ctx)


def _client(ctx: MethodContext) -> CGFedLLMClient:
    from fedbits.methods.cgfedllm.client import CGFedLLMClient

    return CGFedLLMClient(ctx)


register(
    MethodSpec(
        name="cgfedllm",
        options=CGFedLLMOptions,
        server=_server,
        client=_client,
        summary="CG-FedLLM: federated LoRA, then an autoencoder's latent up (1/64 of the change)",
    )
)
