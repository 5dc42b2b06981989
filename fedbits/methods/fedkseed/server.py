"""FedKSeed's server: accumulates the seed pool and keeps the model it stands for.

The exact pool is float64; what clients receive, and what defines the global model,
is the *published* pool: the exact pool quantised once per round to the downlink's
scalar type (:func:`~fedbits.methods.fedkseed.wire.quantize` over all K entries).
Quantising afresh from the exact pool each round keeps the rounding error from
accumulating. The server replays only the seeds whose published scalar changed: it
keeps the int64 accumulator U between rounds (twice a float32 model), and reads the
base weights w0 through ``ctx.base_tensor`` when it writes the model (no copy kept).

Before scalars enter the pool they are bounded (``[robust]``, :class:`~fedbits.robust.
SeedDefence`): each clipped to a multiple of the median |scalar| of recent rounds, each
update's norm over its scalars to a multiple of the median norm, each claimed sample
count capped; a round whose pool could not be published, or would make the model
non-finite, is refused and the pool and model stay as they were.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbits.errors import ClientError
from fedbits.methods._updates import narrow, save_pretrained
from fedbits.methods.base import ClientUpdate, MethodContext
from fedbits.methods.fedkseed import protocol
from fedbits.methods.fedkseed.wire import quantize
from fedbits.robust import SeedDefence
from fedbits.wire import Body, Reader
from fedbits.zo.replay import Replay, SeedKeys, to_fixed

logger = logging.getLogger(__name__)


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
        self.robust = SeedDefence(ctx.robust)
        self.digest = protocol.model_digest(self.model)

    # -- downlink -------------------------------------------------------------------
    def importance_levels(self) -> np.ndarray:
        """Pro: a_j = mean |clip(H_j)|, min-max normalised, as 0..255 levels. As in the
        reference, every history starts with one 0 (its ``--grad_initial``), so the mean
        is over the seed's scalars and that 0: a seed drawn once weighs less than one
        drawn often with the same |scalar|."""
        a = self.history_sum / (self.history_count + 1)
        normalised = (a - a.min()) / (a.max() - a.min() + 1e-10)
        return np.rint(normalised * 255).astype(np.uint8)

    def downlink(self, round_: int, client: int) -> bytes:
        view = self.views.get(client)
        if view is not None and not self.published[self.published != view].all():
            # an entry back at zero: the changes' form drops zero entries (a pool's
            # zeros are implicit), so only the whole pool can carry it
            view = None
        changed = np.nonzero(self.published if view is None else self.published != view)[0]
        body = protocol.encode_downlink(
            view is None, changed, self.published[changed], self.opts.pool_format(),
            self.opts.num_seeds, self.importance_levels() if self.pro else None,
        )
        self._sent[client] = self.published.copy()
        return body

    # -- uplink ---------------------------------------------------------------------
    def decode_uplink(self, round_: int, client: int, body: Body) -> protocol.SeedUpdate:
        sender = f"client {client} uplink"
        update = protocol.decode_uplink(
            Reader(body, sender), client, self.opts.uplink_format(), self.opts.num_seeds,
            self.ctx.clients.local_steps,
        )
        if update.num_samples == 0:
            raise ClientError(f"{sender}: reports zero training samples")
        if not math.isfinite(update.train_loss):
            raise ClientError(
                f"{sender}: reports train_loss {update.train_loss}, not a finite number")
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
        seeds = narrow(updates, protocol.SeedUpdate)
        bounded = self.robust.bound(seeds)
        total = sum(bounded.weights)
        pool = self.pool.copy()
        for u, values, weight in zip(seeds, bounded.values, bounded.weights, strict=True):
            local = np.zeros_like(pool)
            np.add.at(local, u.indices, values)
            pool += (weight / total) * local
        start = time.perf_counter()
        replayed = self.accept(round_, pool)
        if replayed is not None and self.pro:
            clip = self.opts.history_clip
            for u, values in zip(seeds, bounded.values, strict=True):
                np.add.at(self.history_sum, u.indices, np.abs(np.clip(values, -clip, clip)))
                np.add.at(self.history_count, u.indices, 1)
        refused = {"robust_refused": 1} if replayed is None else {}
        return {"replay_seeds": replayed or 0, "replay_seconds": time.perf_counter() - start,
                **bounded.stats, **refused}

    def accept(self, round_: int, pool: np.ndarray) -> int | None:
        """Make ``pool`` the pool and bring the model to it; return the seeds replayed,
        or None, with pool and model as they were, when it cannot be published (not
        finite, beyond the wire's range or exact replay's) or makes the model non-finite."""
        previous = self.pool
        self.pool = pool
        try:
            seeds = self.publish()
        except (ValueError, OverflowError) as e:
            self.pool = previous
            logger.warning("round %d: the aggregated pool cannot be published (%s): refused, "
                           "the model is unchanged", round_, e)
            return None
        if all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            return seeds
        self.pool = previous
        self.publish()  # replay is exact: the model is bit for bit the one before
        logger.warning("round %d: the aggregated pool makes the model non-finite: refused, "
                       "the model is unchanged", round_)
        return None

    def publish(self) -> int:
        """Quantise the pool for the wire and bring the model to it by replay; return
        the seeds replayed. Raises ValueError or OverflowError, changing nothing, for a
        pool that cannot be sent or replayed exactly."""
        published = quantize(self.pool, self.opts.pool_format())
        fixed = to_fixed(published)
        self.published = published
        seeds = self.replay.move_to(fixed)
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
            "robust": self.robust.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool = state["pool"].numpy().copy()
        self.history_sum = state["history_sum"].numpy().copy()
        self.history_count = state["history_count"].numpy().copy()
        self.views = {int(c): v.numpy().copy() for c, v in state["views"].items()}
        self.robust.load_state_dict(state.get("robust", {}))
        self.publish()

    def save_final(self, path: Path) -> None:
        save_pretrained(self.model, path)
