"""FedKSeed's client: sync by replay, τ zeroth-order steps, upload the scalars.

1. Apply the downloaded pool entries to the pool it keeps in its client store.
2. Rebuild the model from its base weights and that pool by exact replay (only the
   changed seeds when this process still holds its accumulator, else all of them,
   chunk by chunk). The base weights are not kept: they are the process's frozen base,
   or read back from the checkpoint on disk one tensor at a time.
3. τ two-point steps, each on a seed drawn from the pool (uniform; Pro: by the
   importance the server sent) and a batch of its data.
4. Upload the (seed index, scalar) pairs, or the touched pool entries if smaller,
   with a digest of the replayed weights that the server checks against its own.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedbits.data.batching import iterate_batches
from fedbits.errors import ClientError, WireError
from fedbits.methods.base import ClientData, ClientResult, ClientStore, MethodContext
from fedbits.methods.fedkseed import protocol
from fedbits.seeding import derive_seed
from fedbits.wire import Body, Reader
from fedbits.zo.replay import Replay, SeedKeys, rebuild, to_fixed
from fedbits.zo.step import ZeroOrderTrainer

POOL_KEY = "fedkseed-pool"


class FedKSeedClient:
    def __init__(self, ctx: MethodContext, pro: bool = False) -> None:
        self.ctx, self.opts, self.pro = ctx, ctx.options, pro
        cfg = ctx.clients
        # every weight trains: a private float32 copy of each (float32 master weights
        # over a bfloat16 base); w0 is read through ctx.base_tensor, never cloned
        self.model = ctx.build_model()
        self.model.eval()
        self.keys = SeedKeys(protocol.pool_seeds(ctx.seed, self.opts.num_seeds))
        # incremental keeps U (int64, twice the model) between rounds, made at the first
        # sync (after the runtime has released the base, never alongside it); full keeps
        # nothing
        self.cache: Replay | None = None
        self.trainer = ZeroOrderTrainer(
            self.model, self.opts.eps, cfg.lr, cfg.weight_decay, self.opts.distribution,
            self.opts.grad_clip,
        )

    def _load_pool(self, store: ClientStore) -> np.ndarray:
        raw = store.get(POOL_KEY)
        if raw is None:
            return np.zeros(self.opts.num_seeds)
        pool = np.frombuffer(raw, dtype="<f8").copy()
        if len(pool) != self.opts.num_seeds:
            raise ClientError(
                f"stored pool has {len(pool)} seeds, the run has {self.opts.num_seeds}")
        return pool

    def sync(self, pool: np.ndarray) -> int:
        """Make the model the one ``pool`` stands for; return the seeds replayed.
        Always rewrites every weight (the last round's local steps are undone)."""
        fix, lr = to_fixed(pool), self.ctx.clients.lr
        if self.opts.client_replay == "full":  # chunk by chunk, no accumulator kept
            return rebuild(self.model, self.keys, self.opts.distribution, fix,
                           self.ctx.base_tensor, lr)
        if self.cache is None:
            self.cache = Replay(self.model, self.keys, self.opts.distribution)
        seeds = self.cache.move_to(fix)
        self.cache.write(self.model, self.ctx.base_tensor, lr)
        return seeds

    def _seed_indices(self, steps: int, seed: int, importance: np.ndarray | None) -> list[int]:
        gen = torch.Generator().manual_seed(derive_seed(seed, "fedkseed-seeds"))
        if importance is None:
            return torch.randint(self.opts.num_seeds, (steps,), generator=gen).tolist()
        probs = torch.softmax(torch.from_numpy(importance.astype(np.float64) / 255), 0)
        return torch.multinomial(probs, steps, replacement=True, generator=gen).tolist()

    def update(
        self, round_: int, client: int, downlink: Body, data: ClientData, store: ClientStore
    ) -> ClientResult:
        if not data.items:
            raise ClientError(f"client {client} has no training data")
        full, indices, values, importance = protocol.decode_downlink(
            Reader(downlink, f"downlink to client {client}"), self.opts.pool_format(),
            self.opts.num_seeds, self.pro,
        )
        pool = np.zeros(self.opts.num_seeds) if full else self._load_pool(store)
        pool[indices] = values
        start = time.perf_counter()
        try:
            replayed = self.sync(pool)
        except OverflowError as e:  # refused before the replay changed anything: no
            # server publishes a pool that its own replay could not hold
            raise WireError(f"downlink to client {client}: field entries.values: {e}") from None
        replay_seconds = time.perf_counter() - start
        store.put(POOL_KEY, pool.astype("<f8").tobytes())  # a pool this client could replay
        digest = protocol.model_digest(self.model)

        cfg = self.ctx.clients
        seeds = self._seed_indices(cfg.local_steps, data.seed, importance)
        batches = iterate_batches(data.items, cfg.batch_size, cfg.local_steps,
                                  torch.Generator().manual_seed(data.seed), data.pad_id)
        steps: list[tuple[int, float]] = []
        losses: list[float] = []
        start = time.perf_counter()
        with self.trainer.attached():
            for done, (index, batch) in enumerate(zip(seeds, batches, strict=True), 1):
                loss_plus, loss_minus, g = self.trainer.step(self.keys.seeds[index], batch)
                if g is not None:  # an injected value attack strikes the scalar it sends
                    steps.append((index, data.injected.tamper_scalar(g)))
                    losses.append((loss_plus + loss_minus) / 2)
                data.injected.step_done(done)  # an injected crash strikes here
        if not steps:
            raise ClientError(f"client {client}: every local step had a non-finite loss")
        stats = {
            "replay_seeds": replayed, "replay_seconds": replay_seconds,
            "train_seconds": time.perf_counter() - start,
            "skipped_steps": cfg.local_steps - len(steps),
        }
        up = protocol.encode_uplink(
            data.claimed_samples, float(np.mean(losses)), digest, steps, self.opts.uplink_format(),
            self.opts.num_seeds, steps_only=self.pro,
        )
        return ClientResult(up, stats)
