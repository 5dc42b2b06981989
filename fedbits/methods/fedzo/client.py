"""FedZO's client: download the dense model, τ zeroth-order steps, upload the change.

A step draws ``num_directions`` directions (seeded by the client's data seed, the step
and the direction, so every runtime takes the same steps), estimates
g_j = (L(θ+εz_j) − L(θ−εz_j)) / 2ε for each at the same θ, then moves
θ ← θ − lr·(mean_j g_j·z_j + wd·θ). With one direction this is the fused step of
:mod:`fedbits.zo.step` (the update is paid inside the next forward); with more, each
estimate leaves the weights alone and the averaged update is applied after them.
A direction with a non-finite loss is left out of the mean; a step with none is skipped.

The wire halves are FedAvg's (:class:`~fedbits.methods._dense.DenseClient`, held, not
inherited): the same downlink decoding, the same uplink body and codec chain.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedbits.compress import ErrorFeedback
from fedbits.compress.tensors import read_values, write_values
from fedbits.errors import ClientError
from fedbits.methods._dense import DenseClient
from fedbits.methods._updates import seeded_generator
from fedbits.methods.base import ClientData, ClientResult, ClientStore, MethodContext
from fedbits.methods.fedzo.options import prepare
from fedbits.seeding import derive_seed
from fedbits.wire import Body, Direction, Reader, Writer
from fedbits.zo.step import ZeroOrderTrainer


class FedZOClient:
    def __init__(self, ctx: MethodContext) -> None:
        self.ctx, self.opts = ctx, ctx.options
        self.dense = DenseClient(ctx, prepare)  # model, layout, downlink fill, chains
        self.dense.model.eval()  # no dropout: both halves of a step see the same network
        cfg = ctx.clients
        self.trainer = ZeroOrderTrainer(
            self.dense.model, self.opts.eps, cfg.lr, cfg.weight_decay, self.opts.distribution
        )

    def update(
        self, round_: int, client: int, downlink: Body, data: ClientData, store: ClientStore
    ) -> ClientResult:
        # heavy: imported where used, as fedbits.methods._updates.train_change does
        from fedbits.data.batching import iterate_batches

        if not data.items:
            raise ClientError(f"client {client} has no training data")
        dense, params = self.dense, self.dense.params
        dense.fill.receive(params, self._received(round_, client, downlink))
        cfg = self.ctx.clients
        batches = iterate_batches(data.items, cfg.batch_size, cfg.local_steps,
                                  torch.Generator().manual_seed(data.seed), data.pad_id)
        losses: list[float] = []
        start = time.perf_counter()
        with self.trainer.attached():
            for step, batch in enumerate(batches):
                losses.extend(self._step(derive_seed(data.seed, "fedzo", step), batch))
                data.injected.step_done(step + 1)  # an injected crash strikes here
        if not losses:
            raise ClientError(f"client {client}: every local step had a non-finite loss")
        train_seconds = time.perf_counter() - start
        # after minus before, the "before" decoded again: no copy held through training
        initial = dense.fill.values(params, self._received(round_, client, downlink))
        delta = {n: initial.pop(n).neg_().add_(p.detach()) for n, p in params.items()}
        for d in delta.values():
            data.injected.tamper(d)
        w = Writer().u32(data.claimed_samples).f32(float(np.mean(losses)))
        chain = dense.chains(round_, Direction.UP, client)
        feedback = None
        if chain is not None and self.opts.error_feedback:
            feedback = ErrorFeedback(store, f"{dense.name}-residual", dense.layout.numel)
        write_values(w, dense.layout, delta, wire_dtype=dense.wire_dtype, chain=chain,
                     generator=seeded_generator(data.seed, "uplink"), feedback=feedback)
        del delta  # the change, before its bytes are joined into the body
        return ClientResult(w.getvalue(), {"train_seconds": train_seconds,
                                           "skipped_steps": cfg.local_steps - len(losses)})

    def _received(self, round_: int, client: int, downlink: Body) -> dict[str, torch.Tensor]:
        """The downlink's weights, decoded as FedAvg's client decodes them."""
        dense = self.dense
        r = Reader(downlink, f"downlink to client {client}")
        received = read_values(r, dense.layout, wire_dtype=dense.wire_dtype,
                               chain=dense.chains(round_, Direction.DOWN, client), field="weights")
        r.finish()
        return received.tensors

    def _step(self, seed: int, batch: dict[str, torch.Tensor]) -> list[float]:
        """One local step of ``num_directions`` estimates; the mean loss of its directions
        (L₊ + L₋)/2, or nothing when every direction's loss was non-finite."""
        if self.opts.num_directions == 1:
            loss_plus, loss_minus, g = self.trainer.step(seed, batch)
            return [] if g is None else [(loss_plus + loss_minus) / 2]
        estimates: list[tuple[int, float]] = []
        losses = []
        for j in range(self.opts.num_directions):
            direction = derive_seed(seed, j)
            loss_plus, loss_minus, g = self.trainer.step(direction, batch, update=False)
            if g is not None:
                estimates.append((direction, g))
                losses.append((loss_plus + loss_minus) / 2)
        for j, (direction, g) in enumerate(estimates):  # decay once per step, not per z
            self.trainer.apply_step(direction, g / len(estimates), decay=j == 0)
        return [float(np.mean(losses))] if losses else []
