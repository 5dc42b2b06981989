"""CG-FedLLM's client: federated LoRA training (the dense methods' client, composed);
in FAF rounds the change goes up as the autoencoder's latent, with what the client
measured of its reconstruction, and the dense update too when it is audited.

The client downloads the whole autoencoder, decoder included: error feedback needs
the receiver's reconstruction of every payload, and so do the reconstruction figures
it reports. It keeps the weights in its store (``cgfedllm-autoencoder``: version,
digest, weights) and uses them while the server announces that version.
"""

from __future__ import annotations

import struct
from functools import partial

from fedbits.compress import Chain
from fedbits.frozen import copy_none
from fedbits.methods._dense import DenseClient
from fedbits.methods.base import ClientData, ClientResult, ClientStore, MethodContext
from fedbits.methods.cgfedllm import protocol
from fedbits.methods.cgfedllm.options import CGFedLLMOptions
from fedbits.methods.fedit import add_lora
from fedbits.wire import Body, Direction, Writer

_HELD = struct.Struct("<I8s")  # version, digest; the weights follow


class CGFedLLMClient:
    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.opts: CGFedLLMOptions = ctx.options
        self.down = protocol.downlink_chain(self.opts)
        self.current: protocol.Tap | None = None  # the uplink chain of this update
        self.dense = DenseClient(ctx, partial(add_lora, opts=self.opts), self._chain,
                                 copied=copy_none)
        self.segments = [p.numel() for p in self.dense.params.values()]
        self.initial = protocol.initial_stage(self.opts, ctx.seed)

    def _chain(self, round_: int, direction: Direction, client: int) -> Chain | None:
        return self.down if direction == Direction.DOWN else self.current

    def update(self, round_: int, client: int, downlink: Body, data: ClientData,
               store: ClientStore) -> ClientResult:
        announce, body = protocol.read_downlink(downlink, f"downlink to client {client}",
                                                self.initial.num_weights)
        weights = None if announce is None else self._weights(announce, store)
        try:
            if announce is None or weights is None:  # TGAP, or an autoencoder it lacks
                self.current = protocol.tap(self.opts.tgap_entries(), "method.uplink")
                result = self.dense.update(round_, client, body, data, store)
                stats: dict[str, float] = {} if announce is None else {"encoder_missing": 1}
                return ClientResult(Writer().u8(protocol.DENSE).raw(result.body).getvalue(),
                                    stats)
            stage = self.initial.trained(announce.version, weights)
            self.current = tap = protocol.tap(self.opts.faf_entries(), "method.uplink", stage)
            result = self.dense.update(round_, client, body, data, store)
            x, y, latent_bytes = tap.reconstruction()
        finally:
            self.current = None  # and what it kept of this client's update
        claims, topk_bytes = protocol.measure(x, y, latent_bytes, self.opts.faf_tail(),
                                              self.segments)
        w = claims.write(Writer().u8(protocol.LATENT).u32(announce.version))
        if announce.audit:
            w.tensor(x)
        return ClientResult(w.raw(result.body).getvalue(), {
            **claims.as_stats(), "latent_bytes": latent_bytes, "topk_bytes": topk_bytes,
            "encoder_downloaded": int(announce.weights is not None)})

    def _weights(self, announce: protocol.Announce, store: ClientStore) -> bytes | None:
        """The announced autoencoder's weights: downloaded now (and kept), or kept from
        an earlier round; None when the store holds another version or none."""
        if announce.weights is not None:
            store.put(protocol.STORE_KEY, _HELD.pack(announce.version, announce.digest)
                      + announce.weights)
            return announce.weights
        held = store.get(protocol.STORE_KEY)
        if held is None or len(held) != _HELD.size + 4 * self.initial.num_weights:
            return None
        version, digest = _HELD.unpack_from(held)
        if (version, digest) != (announce.version, announce.digest):
            return None
        return held[_HELD.size :]

