"""Partial model training with quantised uplinks (Ro et al. 2022, arXiv 2204.09715).

Ro et al. fit a larger model into cross-device FL with four techniques, each an
option here:

* **partial model training**: each client trains and uploads only a subset of the
  decoder layers (``layer_fraction`` / ``layers`` / ``include`` / ``exclude``),
  fixed or cycling over rounds and clients (``schedule``, ``order``; see
  :mod:`fedbits.methods._blocks.subset`); everything else is frozen on the client
  (no gradient, no optimizer state) and stays bit-identical to the pretrained weights;
* **quantised uplink**: the change goes up through a codec chain (``uplink``,
  default ``["int8"]``), optionally with error feedback;
* **efficient transfer learning**: start from the pretrained model, optionally
  training LoRA adapters instead of the weights (``lora = true``);
* **server optimizers**: ``server_opt`` avg, fedavgm, fedadam, fedyogi or fedadagrad
  on the mean change, applied only to tensors some client updated this round.

Downlink: the current values of every tensor the schedule can ever train (the
*universe*; everything else is the pretrained model every client already holds), so
a client needs no state between rounds. With a fixed 1/4 of the layers that is 1/4
of the model.

Downlink body: slot u32 | universe values (fingerprint u64 + ``wire_dtype`` tensor or
``downlink`` chain payload)
Uplink body:   num_samples u32 | train_loss f32 | the block's Δ (fingerprint u64 of the
block's layout + ``wire_dtype`` tensor or ``uplink`` chain payload)

The slot is the client's position in the round's cohort; both halves turn (run seed,
round, slot) into the same block, so no parameter name travels.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from fedbits.compress import Chain, ErrorFeedback, parse_chain
from fedbits.config import Config
from fedbits.errors import ClientError
from fedbits.frozen import copy_none, own
from fedbits.methods._blocks import (
    Cohort,
    Subset,
    SubsetOptions,
    read_values,
    subset_from_options,
    train_only,
    write_values,
)
from fedbits.methods._updates import (
    DeltaUpdate,
    DownlinkFill,
    check_change,
    load_optimizer_checkpoint,
    narrow,
    optimizer_checkpoint,
    save_pretrained,
    seeded_generator,
    train_change,
)
from fedbits.methods.base import (
    ClientData,
    ClientResult,
    ClientStore,
    ClientUpdate,
    MethodContext,
    MethodSpec,
    refuse_float16_adamw,
)
from fedbits.methods.fedit import FedITOptions, add_lora
from fedbits.methods.registry import register
from fedbits.privacy import ClientLevelDP
from fedbits.robust import RobustAggregator
from fedbits.server_opt import apply_pseudo_gradient, make_server_optimizer
from fedbits.wire import Body, Layout, Reader, Writer


class PartialOptions(FedITOptions, SubsetOptions):
    privacy_refusal: ClassVar[str | None] = None  # PartialServer clips and noises
    uplink: list[str] = Field(
        default_factory=lambda: ["int8"],
        description="codec chain for the trained block's change ([] sends wire_dtype values)",
    )
    lora: bool = Field(
        False, description="train LoRA adapters (lora_* options) instead of the weights"
    )

    def check_config(self, cfg: Config) -> None:
        if not self.lora:
            refuse_float16_adamw(cfg, "the model's own weights (method.lora = false)")


class _PartialHalf:
    """What both halves build identically: the model, the subset and the layouts."""

    def __init__(self, ctx: MethodContext) -> None:
        opts: PartialOptions = ctx.options
        self.ctx, self.opts, self.name = ctx, opts, ctx.method
        # LoRA trains adapters of its own; else the half copies what its schedule can train
        model = ctx.build_model(copy_none)
        self.model = add_lora(model, opts) if opts.lora else model
        # with LoRA only the adapters are candidates (peft froze the rest), else every weight
        candidates = {
            n: p for n, p in self.model.named_parameters() if p.requires_grad or not opts.lora
        }
        self.subset: Subset = subset_from_options(
            list(candidates), opts, seed=ctx.seed, cohort=ctx.cohort,
            model_name=f"model {ctx.model_name!r}",
        )
        if not opts.lora:
            own(self.model, list(self.subset.universe), torch.float32)
            candidates = dict(self.model.named_parameters())
        self.params = {n: candidates[n] for n in self.subset.universe}
        train_only(self.model, self.params)
        self.layout = Layout.of(self.params)
        self.fill = DownlinkFill(opts.downlink_base, self.params)
        self.wire_dtype: torch.dtype = getattr(torch, opts.wire_dtype)
        self.up: Chain | None = (
            parse_chain(opts.uplink, field="method.uplink") if opts.uplink else None
        )
        self.down: Chain | None = (
            parse_chain(opts.downlink, field="method.downlink") if opts.downlink else None
        )
        self._block_layouts: dict[int, Layout] = {}

    def block_layout(self, block: int) -> Layout:
        if block not in self._block_layouts:
            names = self.subset.blocks[block]
            self._block_layouts[block] = Layout.of({n: self.params[n] for n in names})
        return self._block_layouts[block]


class PartialServer(_PartialHalf):
    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.optimizer = make_server_optimizer(list(self.params.values()), self.opts)
        self.cohort = Cohort()
        self.robust = RobustAggregator(ctx.robust, ctx.device)
        self.privacy = ClientLevelDP.of(ctx.privacy, ctx.seed, ctx.device)
        self._values: tuple[int, bytes] | None = None  # (round, encoded universe): once per round

    def downlink(self, round_: int, client: int) -> bytes:
        slot = self.cohort.assign(round_, client)
        if self._values is None or self._values[0] != round_:
            w = Writer()
            gen = seeded_generator(self.ctx.seed, "downlink", round_)
            write_values(w, self.layout, self.fill.to_send(self.params), wire_dtype=self.wire_dtype,
                         chain=self.down, generator=gen)
            self._values = (round_, w.getvalue())
        return Writer().u32(slot).raw(self._values[1]).getvalue()

    def decode_uplink(self, round_: int, client: int, body: Body) -> DeltaUpdate:
        sender = f"client {client} uplink"
        r = Reader(body, sender)
        block, _ = self.subset.select(round_, self.cohort.slot(round_, client, sender))
        num_samples = r.u32("num_samples")
        train_loss = r.f32("train_loss")
        delta = read_values(r, self.block_layout(block), wire_dtype=self.wire_dtype, chain=self.up,
                            field="delta")
        r.finish()
        check_change(sender, num_samples, train_loss, delta)
        update = DeltaUpdate(client, num_samples, train_loss, dict(delta))  # the block's tensors
        self.robust.admit(round_, update)
        if self.privacy is not None:
            self.privacy.clip(round_, update.delta)
        return update

    @torch.no_grad()
    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """Per tensor, the combined change of the clients that trained it (by default
        their sample-weighted mean, ``[robust]``; noised by ``[privacy]``); one server
        step on those tensors only."""
        deltas = narrow(updates, DeltaUpdate)
        outcome = self.robust.combine(round_, deltas, self.params)
        if outcome.changes and self.privacy is not None:
            received = Counter(name for u in deltas for name in u.delta)
            outcome.stats.update(self.privacy.release_(
                round_, outcome.changes, received, self._scheduled(round_), self.params))
        names = list(outcome.changes)
        if names:
            apply_pseudo_gradient(self.optimizer, [self.params[n] for n in names],
                                  [outcome.changes[n] for n in names])
        self._values = None
        return {"tensors_updated": len(names), **outcome.stats}

    def _scheduled(self, round_: int) -> Counter[str]:
        """Per tensor, the clients of a full cohort the schedule gives it this round: the
        denominator of its noised mean, fixed whoever answers."""
        return Counter(name for slot in range(self.ctx.cohort)
                       for name in self.subset.select(round_, slot)[1])

    def global_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {**optimizer_checkpoint(self.params, self.optimizer),
                "robust": self.robust.state_dict(),
                **({"privacy": self.privacy.state_dict()} if self.privacy is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_checkpoint(self.params, self.optimizer, state)
        self.robust.load_state_dict(state.get("robust", {}))
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])
        self._values = None

    def save_final(self, path: Path) -> None:
        save_pretrained(self.model, path)


class PartialClient(_PartialHalf):
    """One working model for every client this process simulates: the universe is
    overwritten from each downlink and nothing else ever changes, so no reset is needed."""

    def update(
        self, round_: int, client: int, downlink: Body, data: ClientData, store: ClientStore
    ) -> ClientResult:
        if not data.items:
            raise ClientError(f"client {client} has no training data")
        r = Reader(downlink, f"downlink to client {client}")
        slot = r.u32("slot")
        received = read_values(r, self.layout, wire_dtype=self.wire_dtype, chain=self.down,
                               field="weights")
        r.finish()
        self.fill.receive(self.params, received)
        del received
        block, names = self.subset.select(round_, slot)
        trained = {n: self.params[n] for n in names}
        train_only(self.model, trained)
        change = train_change(self.model, trained, data, self.ctx.clients)

        w = Writer().u32(data.claimed_samples).f32(change.loss)
        feedback = None
        if self.up is not None and self.opts.error_feedback:
            feedback = ErrorFeedback(store, f"{self.name}-residual-{block}",
                                     self.block_layout(block).numel)
        gen = seeded_generator(data.seed, "uplink")
        write_values(w, self.block_layout(block), change.delta, wire_dtype=self.wire_dtype,
                     chain=self.up, generator=gen, feedback=feedback)
        return ClientResult(w.getvalue(), stats={
            "block": block, "trained_params": self.block_layout(block).numel,
            "train_seconds": change.seconds,
            "seconds_per_step": change.seconds / self.ctx.clients.local_steps,
        })


register(
    MethodSpec(
        name="partial",
        options=PartialOptions,
        server=PartialServer,
        client=PartialClient,
        summary="partial model training (Ro et al.): a subset of layers per round, "
        "quantised change up, FedAvgM/FedAdam/FedYogi/FedAdagrad server",
    )
)
