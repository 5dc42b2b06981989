"""CG-FedLLM's server: federated LoRA (the dense methods' server, composed), the
temporal ensemble and the autoencoder's training (TGAP), then latents decoded, the
clients' reconstruction claims checked, and the autoencoder's versions (FAF).

Which round is which: the first ``tgap_rounds(run.rounds)`` rounds are TGAP. The
autoencoder is trained when the first FAF downlink is asked for, so a run that ends
in TGAP trains none, and a run extended on resume before its boundary follows its new
length; once trained, the boundary is fixed in the checkpoint.

Who holds the autoencoder: a client is remembered as holding the current version once
an uplink of it declares that version (so a client whose round failed, whose store
kept nothing, gets the weights again), in a bounded set (``max_holders``, oldest
forgotten: a forgotten client downloads again, and the ledger counts it).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedbits.compress import Chain
from fedbits.compress.stages.autoencoder import Autoencoder
from fedbits.errors import ClientError, WireError
from fedbits.frozen import copy_none
from fedbits.methods._dense import DenseServer
from fedbits.methods.base import ClientUpdate, MethodContext
from fedbits.methods.cgfedllm import protocol
from fedbits.methods.cgfedllm.ensemble import Ensemble, train
from fedbits.methods.cgfedllm.options import CGFedLLMOptions
from fedbits.methods.fedit import add_lora
from fedbits.seeding import derive_seed
from fedbits.wire import Body, Direction, Reader

logger = logging.getLogger(__name__)


class CGFedLLMServer:
    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.opts: CGFedLLMOptions = ctx.options
        self.down = protocol.downlink_chain(self.opts)
        self.current: protocol.Tap | None = None  # the uplink chain of the body being read
        self.dense = DenseServer(ctx, partial(add_lora, opts=self.opts), self._chain,
                                 copied=copy_none)
        self.numel = self.dense.layout.numel
        self.segments = [p.numel() for p in self.dense.params.values()]
        self.tgap = protocol.tap(self.opts.tgap_entries(), "method.uplink")
        self.stage = protocol.initial_stage(self.opts, ctx.seed)
        self.faf = protocol.tap(self.opts.faf_entries(), "method.uplink", self.stage)
        self.ensemble = self._new_ensemble()
        self.boundary: int | None = None  # the last TGAP round, once the autoencoder trained
        self.trained_round = 0  # the round whose first downlink trained the current version
        self.holders: dict[int, None] = {}  # clients holding the current version, oldest first
        self._round: dict[str, Any] = {}  # this round's figures, for aggregate
        self._figures_round = 0
        self._bodies: dict[tuple[int, bool, bool], bytes] = {}

    # -- the schedule ---------------------------------------------------------------
    def last_tgap_round(self) -> int:
        if self.boundary is not None:
            return self.boundary
        return self.opts.tgap_rounds(self.ctx.rounds)

    def _chain(self, round_: int, direction: Direction, client: int) -> Chain | None:
        return self.down if direction == Direction.DOWN else self.current

    def _prepare(self, round_: int) -> None:
        """Train the autoencoder before the first FAF round's first downlink, and again
        every ``refresh_every`` FAF rounds."""
        if self.trained_round == round_:
            return
        since = round_ - self.last_tgap_round() - 1
        first = self.stage.version == 0
        refresh = self.opts.refresh_every and since > 0 and since % self.opts.refresh_every == 0
        if not (first or refresh):
            return
        began = time.perf_counter()
        version = self.stage.version + 1
        weights, loss = train(self.stage, self.ensemble, self.opts.ae_epochs, self.opts.ae_lr,
                              self.opts.ae_batch, derive_seed(self.ctx.seed, "cgfedllm-train",
                                                              version))
        self._set_version(self.stage.trained(version, weights))
        self.boundary = self.last_tgap_round()
        self.trained_round = round_
        if not self._keeps_ensemble():
            self.ensemble = self._new_ensemble()  # empty: nothing will train on it
        self._round.update(ae_train_loss=loss, ae_train_seconds=time.perf_counter() - began)
        logger.info("cgfedllm: autoencoder version %d (%d weights, %s) for rounds %d on",
                    version, self.stage.num_weights, self.stage.digest, round_)

    def _keeps_ensemble(self) -> bool:
        """Whether the ensemble is still to be trained on: until the first version, and
        for every refresh."""
        return not self.stage.version or bool(self.opts.refresh_every)

    def _new_ensemble(self) -> Ensemble:
        capacity = self.opts.ensemble_chunks if self._keeps_ensemble() else 0
        return Ensemble(capacity, self.opts.chunk, derive_seed(self.ctx.seed, "cgfedllm-ensemble"))

    def _begin(self, round_: int) -> None:
        """This round's figures start empty, whether or not the last round aggregated."""
        if self._figures_round != round_:
            self._round, self._figures_round = {}, round_

    def _set_version(self, stage: Autoencoder) -> None:
        self.stage = stage
        self.faf = protocol.tap(self.opts.faf_entries(), "method.uplink", stage)
        self.holders = {}
        self._bodies = {}

    # -- the round ------------------------------------------------------------------
    def downlink(self, round_: int, client: int) -> bytes:
        self._begin(round_)
        faf = round_ > self.last_tgap_round()
        if faf:
            self._prepare(round_)
        dense = self.dense.downlink(round_, client)
        weights = faf and client not in self.holders
        audit = faf and protocol.audited(self.ctx.seed, round_, client, self.opts.audit_fraction)
        key = (round_, weights, audit)
        if key not in self._bodies:
            self._bodies = {k: v for k, v in self._bodies.items() if k[0] == round_}
            announce = None
            if faf:
                assert self.stage.weights is not None  # trained by _prepare
                announce = protocol.Announce(
                    self.stage.version, protocol.digest(self.stage.weights),
                    self.stage.weights if weights else None, audit)
            self._bodies[key] = protocol.write_downlink(announce, dense)
        if weights:
            self._count("encoder_downloads")
        return self._bodies[key]

    def decode_uplink(self, round_: int, client: int, body: Body) -> ClientUpdate:
        self._begin(round_)
        sender = f"client {client} uplink"
        faf = round_ > self.last_tgap_round()
        r = Reader(body, sender)
        kind = r.u8("kind")
        if kind == protocol.DENSE:
            self.current = self.tgap
            update = self._decode_dense(round_, client, protocol.rest(body, r))
            if faf:  # it holds no copy of the autoencoder: it gets one next time
                self.holders.pop(client, None)
                self._count("dense_uplinks")
            if self.ensemble.capacity and self.tgap.decoded is not None:
                self.ensemble.add(self.tgap.decoded)
            return update
        if kind != protocol.LATENT:
            raise WireError(f"{sender}: field kind: {kind} is neither dense (0) nor latent (1)")
        if not faf:
            raise ClientError(f"{sender}: a latent in TGAP round {round_}, before any "
                              "autoencoder was published")
        version = r.u32("version")
        if version != self.stage.version:
            raise ClientError(f"{sender}: latent encoded with autoencoder version {version}; "
                              f"the server decodes version {self.stage.version}, which the "
                              "client downloads when it is sampled")
        claims = protocol.Claims.read(r)
        claims.check(sender)
        audit = None
        if protocol.audited(self.ctx.seed, round_, client, self.opts.audit_fraction):
            audit = r.tensor("audit", count=self.numel, dtype=torch.float32)
            if not torch.isfinite(audit).all():
                raise ClientError(f"{sender}: non-finite values in the audit upload")
        self.holders.pop(client, None)
        self.holders[client] = None
        while len(self.holders) > self.opts.max_holders:
            del self.holders[next(iter(self.holders))]
        self.current = self.faf
        if audit is not None:
            self.faf.inspect = partial(self._audit, client, claims, audit)
        try:
            update = self._decode_dense(round_, client, protocol.rest(body, r))
        finally:
            self.faf.inspect = None
        self._round.setdefault("claims", {})[client] = claims
        if audit is not None and self.ensemble.capacity:
            self.ensemble.add(audit)
        return update

    def _decode_dense(self, round_: int, client: int, body: Body) -> ClientUpdate:
        assert self.current is not None
        self.current.decoded = None
        try:
            return self.dense.decode_uplink(round_, client, body)
        finally:
            self.current = None

    def _count(self, key: str) -> None:
        self._round[key] = self._round.get(key, 0) + 1

    def _audit(self, client: int, claims: protocol.Claims, dense: torch.Tensor,
               decoded: torch.Tensor, payload_bytes: int) -> None:
        """Check a client's claims against its dense upload and the server's own decode
        of its latent, before the update is folded in."""
        truth, _ = protocol.measure(dense, decoded, payload_bytes, self.opts.faf_tail(),
                                    self.segments)
        for name, claimed in claims.as_stats().items():
            actual = getattr(truth, name)
            if abs(claimed - actual) > self.opts.audit_tolerance:
                raise ClientError(f"client {client} uplink: claims {name} = {claimed:.6g}, "
                                  f"but its dense audit upload gives {actual:.6g}")
        self._round.setdefault("audits", {})[client] = truth

    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> dict[str, float]:
        stats = self.dense.aggregate(round_, updates)
        accepted = {u.client for u in updates}
        figures, self._round = self._round, {}
        claims, audits = ([c for client, c in figures.pop(key, {}).items() if client in accepted]
                          for key in ("claims", "audits"))
        stats.update(phase=float(round_ > self.last_tgap_round()),
                     encoder_version=self.stage.version, ensemble_chunks=len(self.ensemble),
                     **figures)
        for name in ("recon_cosine", "recon_rel_error", "topk_cosine", "topk_rel_error"):
            if claims:
                stats[name] = sum(getattr(c, name) for c in claims) / len(claims)
            if audits:
                stats[f"audit_{name}"] = sum(getattr(a, name) for a in audits) / len(audits)
        if claims:
            stats["recon_cosine_min"] = min(c.recon_cosine for c in claims)
        stats["audits"] = len(audits)
        self._bodies = {}
        return stats

    # -- the rest of the contract ----------------------------------------------------
    def global_model(self) -> nn.Module:
        return self.dense.global_model()

    def save_final(self, path: Path) -> None:
        self.dense.save_final(path)

    def state_dict(self) -> dict[str, Any]:
        weights = self.stage.weights
        return {
            "dense": self.dense.state_dict(),
            "version": self.stage.version,
            "weights": torch.frombuffer(bytearray(weights), dtype=torch.float32)
            if weights else torch.zeros(0),
            "boundary": -1 if self.boundary is None else self.boundary,
            "trained_round": self.trained_round,
            "holders": torch.tensor(list(self.holders), dtype=torch.int64),
            "ensemble": self.ensemble.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense.load_state_dict(state["dense"])
        stage = protocol.initial_stage(self.opts, self.ctx.seed)
        if state["version"]:
            stage = stage.trained(int(state["version"]), state["weights"])
        self._set_version(stage)
        self.boundary = None if state["boundary"] < 0 else int(state["boundary"])
        self.trained_round = int(state["trained_round"])
        self.holders = dict.fromkeys(int(c) for c in state["holders"].tolist())
        self.ensemble = self._new_ensemble()
        self.ensemble.load_state_dict(state["ensemble"])
