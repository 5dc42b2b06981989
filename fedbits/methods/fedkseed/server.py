"""FedKSeed's server: accumulates the seed pool and keeps the model it stands for.

The exact pool is float64; what clients receive, and what defines the global model,
is the *published* pool: the exact pool quantised once per round to the downlink's
scalar type (:func:`~fedbits.methods.fedkseed.wire.quantize` over all K entries).
Quantising afresh from the exact pool each round keeps the rounding error from
accumulating. The server replays only the seeds whose published scalar changed: it
keeps the int64 accumulator U between rounds (twice a float32 model), and reads the
base weights w0 through ``ctx.base_tensor`` when it writes the model (no copy kept).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbits.errors import ClientError
from fedbits.methods._updates import save_pretrained
from fedbits.methods.base import ClientUpdate, MethodContext
from fedbits.methods.fedkseed import protocol
from fedbits.methods.fedkseed.wire import quantize
from fedbits.wire import Reader
from fedbits.zo.replay import Replay, SeedKeys, to_fixed


class FedKSeedServer:
    def __init__(self, ctx: MethodContext, pro: bool = False) -> None:
        self.ctx, self.opts, self.pro = ctx, ctx.options, pro
        self.lr = ctx.clients.lr
        self.model = ctx.build_model()  # float32 master copy of every weight
        self.model.eval()
        self.keys = SeedKeys(protocol.pool_seeds(ctx.seed, self.opts.num_seeds))
        self.replay = Replay(self.model, self.keys, self.opts.distribution)
        k = self.opts.num_seeds
        self.pool = np.zeros(k)  # exact accumulated scalars
        self.published = np.zeros(k)  # what clients receive; defines the model
        self.history_sum = np.zeros(k)  # Pro: Σ |clip(scalar)| per seed
        self.history_count = np.zeros(k, dtype=np.int64)
        self.views: dict[int, np.ndarray] = {}  # published pool each client verifiably holds
        self._sent: dict[int, np.ndarray] = {}
        self.digest = protocol.model_digest(self.model)

    # -- downlink -------------------------------------------------------------------
    def importance_levels(self) -> np.ndarray:
        """Pro: a_j = mean |clip(H_j)|, min-max normalised, as 0..255 levels."""
        a = np.divide(self.history_sum, self.history_count,
                      out=np.zeros_like(self.history_sum), where=self.history_count > 0)
        normalised = (a - a.min()) / (a.max() - a.min() + 1e-10)
        return np.rint(normalised * 255).astype(np.uint8)

    def downlink(self, round_: int, client: int) -> bytes:
        view = self.views.get(client)
        changed = np.nonzero(self.published if view is None else self.published != view)[0]
        body = protocol.encode_downlink(
            view is None, changed, self.published[changed], self.opts.pool_format(),
            self.opts.num_seeds, self.importance_levels() if self.pro else None,
        )
        self._sent[client] = self.published.copy()
        return body

    # -- uplink ---------------------------------------------------------------------
    def decode_uplink(self, round_: int, client: int, body: bytes) -> protocol.SeedUpdate:
        sender = f"client {client} uplink"
        update = protocol.decode_uplink(
            Reader(body, sender), client, self.opts.uplink_format(), self.opts.num_seeds,
            self.ctx.clients.local_steps,
        )
        if update.num_samples == 0:
            raise ClientError(f"{sender}: reports zero training samples")
        if update.digest != self.digest:
            self.views.pop(client, None)  # resend everything next time
            raise ClientError(
                f"{sender}: its replayed model differs from the server's (digest "
                f"{update.digest:08x}, expected {self.digest:08x}); update refused"
            )
        if len(update.values) and np.abs(update.values).max() > self.opts.max_scalar:
            raise ClientError(
                f"{sender}: a scalar exceeds method.max_scalar={self.opts.max_scalar:g}")
        if self.pro and update.form != protocol.STEPS:
            raise ClientError(f"{sender}: FedKSeed-Pro needs the per-step scalars")
        self.views.pop(client, None)  # re-inserted last: the views are kept in use order
        self.views[client] = self._sent.pop(client)
        while len(self.views) > self.opts.max_views:  # forget the longest unseen client
            self.views.pop(next(iter(self.views)))
        return update

    # -- aggregation ----------------------------------------------------------------
    @torch.no_grad()
    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> dict[str, float]:
        total = sum(u.num_samples for u in updates)
        for u in updates:
            assert isinstance(u, protocol.SeedUpdate)
            local = np.zeros_like(self.pool)
            np.add.at(local, u.indices, u.values)
            self.pool += (u.num_samples / total) * local
            if self.pro:
                clip = self.opts.history_clip
                np.add.at(self.history_sum, u.indices, np.abs(np.clip(u.values, -clip, clip)))
                np.add.at(self.history_count, u.indices, 1)
        start = time.perf_counter()
        seeds = self.publish()
        return {"replay_seeds": seeds, "replay_seconds": time.perf_counter() - start}

    def publish(self) -> int:
        """Quantise the pool for the wire and bring the model to it by replay; return
        the seeds replayed."""
        self.published = quantize(self.pool, self.opts.pool_format())
        seeds = self.replay.move_to(to_fixed(self.published))
        self.replay.write(self.model, self.ctx.base_tensor, self.lr)
        self.digest = protocol.model_digest(self.model)
        return seeds

    # -- the rest of the server protocol --------------------------------------------
    def global_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Scalars only: the model is a function of them, rebuilt exactly on load."""
        t = torch.from_numpy
        return {
            "pool": t(self.pool.copy()),
            "history_sum": t(self.history_sum.copy()),
            "history_count": t(self.history_count.copy()),
            "views": {str(c): t(v.copy()) for c, v in self.views.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool = state["pool"].numpy().copy()
        self.history_sum = state["history_sum"].numpy().copy()
        self.history_count = state["history_count"].numpy().copy()
        self.views = {int(c): v.numpy().copy() for c, v in state["views"].items()}
        self.publish()

    def save_final(self, path: Path) -> None:
        save_pretrained(self.model, path)
