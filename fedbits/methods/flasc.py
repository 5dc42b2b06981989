"""FLASC / CELLM: federated LoRA with sparse communication both ways.

Each round the server sends the global top-k (by magnitude) of all LoRA weights at
download density ρ_d; the client zero-fills the rest, trains the whole adapter
densely, and sends back the top-k of its change at upload density ρ_u. The server
treats the sample-weighted mean change as a pseudo-gradient for Adam (lr 1e-3, no
weight decay — the reference code's AdamW silently adds 0.01). Densities may decay
as ρ · decay^((round − 1) // decay_every). Sparse positions travel through
``fedbits.compress``, whose index coding (bitmask, delta-varint or Elias–Fano,
whichever is smallest) is counted in every byte the ledger records.

Variants: ``client_freeze`` trains only the positions that came down (the
pruning-style sparse-LoRA baseline); ``freeze_a`` keeps every LoRA A at its shared
initialisation and moves only B (FFA-LoRA); ``downlink_base = "init"`` sends the
top-k of the change since the seeded initial adapter instead of the weights, so the
random LoRA A (which every client rebuilds for free) is not zeroed and the download
is not spent on it (docs/compress.md measures both).

``eval_masked`` (on by default, as in FLASC's paper) evaluates, and saves as the final
model, the adapter a client downloads next round — sparsified by the download density —
rather than the dense server adapter, which no client ever holds. ``density_tiers``
gives clients different upload densities (FLASC's system-heterogeneity setting): client
``c`` uploads at ``density_tiers[c % len(density_tiers)]``; the download stays one
broadcast per round. FLASC's server weighs clients equally: set
``robust.server_weighting = "uniform"`` for the paper's setting (docs/compress.md).
"""

from __future__ import annotations

import logging
from functools import lru_cache, partial
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from fedbits.compress import Chain, parse_chain
from fedbits.compress.tensors import read_values
from fedbits.frozen import copy_none
from fedbits.methods._dense import (
    ADAPTIVE_SERVER_LR,
    ChainPlan,
    DenseClient,
    DenseServer,
    Prepare,
    trainable_tensors,
)
from fedbits.methods._updates import save_pretrained
from fedbits.methods.base import ClientUpdate, MethodContext, MethodSpec
from fedbits.methods.fedit import FedITOptions, add_lora
from fedbits.methods.registry import register
from fedbits.server_opt import ServerOptName
from fedbits.wire import Direction, Reader

logger = logging.getLogger(__name__)


class FlascOptions(FedITOptions):
    sparsifies_uplink: ClassVar[bool] = True
    privacy_refusal: ClassVar[str | None] = None  # DenseServer clips and noises
    density_up: float = Field(1 / 16, gt=0, le=1, description="ρ_u: fraction of the change sent up")
    density_down: float = Field(
        1 / 16, gt=0, le=1, description="ρ_d: fraction of the weights sent down"
    )
    density_decay: float = Field(1.0, gt=0, le=1, description="densities shrink by this factor ...")
    decay_every: int = Field(1, ge=1, description="... every this many rounds")
    client_freeze: bool = Field(False, description="train only the received positions")
    freeze_a: bool = Field(False, description="FFA-LoRA: LoRA A stays at its initialisation")
    eval_masked: bool = Field(
        True, description="evaluate (and save as final) the sparse adapter clients download, "
        "not the dense server adapter (FLASC's paper setting)"
    )
    density_tiers: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=list, description="per-client upload densities in place of density_up: "
        "client c uploads at density_tiers[c % len]; decays like density_up"
    )
    # FLASC's settings where they differ from the other dense methods
    lora_dropout: float = Field(
        0.1, ge=0, lt=1, description="dropout on the LoRA path while training"
    )
    server_opt: ServerOptName = Field(
        "fedadam", description="the server's rule on the mean change; FLASC's is fedadam "
        "(avg drifts over a sparse download)"
    )
    server_lr: float = Field(
        ADAPTIVE_SERVER_LR, gt=0, description="the server optimizer's rate; unset, it follows "
        f"server_opt: {ADAPTIVE_SERVER_LR:g} for the adaptive rules, 1.0 for avg and fedavgm"
    )
    server_beta2: float = Field(
        0.999, ge=0, lt=1, description="the adaptive rules' second-moment decay"
    )
    server_eps: float = Field(1e-8, gt=0, description="the adaptive rules' tau (Adam's eps)")

    @model_validator(mode="after")
    def _value_stages_only(self) -> FlascOptions:
        for field in ("uplink", "downlink"):
            # the registry knows each stage's role, so a plugin sparsifier is caught too
            if parse_chain(getattr(self, field), f"method.{field}").is_sparse:
                raise ValueError(
                    f"method.{field}: {getattr(self, field)!r} selects positions, but flasc "
                    "chooses them itself (set density_up / density_down); list only value "
                    "and byte stages such as 'int8', 'zstd'"
                )
        return self

    @model_validator(mode="after")
    def _tiers_replace_density_up(self) -> FlascOptions:
        if not self.density_tiers:
            return self
        if len(self.density_tiers) < 2:
            raise ValueError("method.density_tiers needs two or more densities "
                             "(one density for every client is method.density_up)")
        if "density_up" in self.model_fields_set:
            raise ValueError("set method.density_up or method.density_tiers, not both")
        return self

    def density(self, round_: int, direction: Direction, client: int = 0) -> float:
        """The round's density; ``client`` picks the upload tier with ``density_tiers``."""
        if direction == Direction.DOWN:
            base = self.density_down
        elif self.density_tiers:
            base = self.density_tiers[client % len(self.density_tiers)]
        else:
            base = self.density_up
        return base * self.density_decay ** ((max(round_, 1) - 1) // self.decay_every)


def flasc_chains(opts: FlascOptions) -> ChainPlan:
    """Top-k at the round's density, then the user's value stages."""

    @lru_cache(maxsize=8)
    def chain(density: float, direction: Direction) -> Chain:
        extra = opts.uplink if direction == Direction.UP else opts.downlink
        return parse_chain([f"topk:{density!r}", *extra],
                           field=f"method.{direction.name.lower()}link")

    return lambda round_, direction, client: chain(
        opts.density(round_, direction, client), direction)


def prepare(model: nn.Module, opts: FlascOptions) -> nn.Module:
    model = add_lora(model, opts)
    if opts.freeze_a:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def warn_if_plain_averaging_drifts(opts: FlascOptions) -> None:
    """Measured, not guessed: with plain averaging the dense server adapter piles up
    changes that clients trained from a truncated download, and held-out loss rises
    after a few rounds (docs/compress.md). It stays allowed, for ablations.

    Logged when the run builds its server, not when the options validate: a run
    validates them several times (config, server, clients), and says this once."""
    if opts.server_opt == "avg" and opts.density_down < 1:
        logger.warning(
            "flasc with method.server_opt = 'avg' and density_down %g < 1 drifts after a few "
            "rounds (docs/compress.md: held-out loss 2.99 vs fedit's 0.56 at 10 rounds); "
            "FLASC's server is 'fedadam' with server_lr 1e-3", opts.density_down,
        )


class FlascServer(DenseServer):
    """The dense server, evaluating and saving the masked download with ``eval_masked``.

    The evaluated adapter is what a client decodes from next round's downlink, bit for
    bit: the same encoder, the same chain (top-k at next round's density, then the value
    stages), decoded as the client decodes it, into a second adapter on the shared frozen
    base. FLASC's reference code applies the mask chosen before the server step to the
    weights after it, a model no client receives. The final directory holds the evaluated
    model, so it reproduces the last reported metrics; the dense adapter (what training
    continues from) is in the checkpoints."""

    def __init__(self, ctx: MethodContext, prepare_: Prepare, chains: ChainPlan) -> None:
        super().__init__(ctx, prepare_, chains, copied=copy_none)
        self.prepare = prepare_
        self.aggregated = 0  # the last round aggregated: evaluation shows the next download
        self._masked: nn.Module | None = None  # built at the first evaluation

    def _download_differs(self, round_: int) -> bool:
        """Whether ``round_``'s download is not the dense adapter as it is: a density
        below 1 (decay included) or value stages change it."""
        opts: FlascOptions = self.ctx.options
        return opts.density(round_, Direction.DOWN) < 1 or bool(opts.downlink)

    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> dict[str, float]:
        stats = super().aggregate(round_, updates)
        self.aggregated = round_
        return stats

    @torch.no_grad()
    def global_model(self) -> nn.Module:
        round_ = self.aggregated + 1
        if not (self.ctx.options.eval_masked and self._download_differs(round_)):
            return self.model
        if self._masked is None:
            self._masked = self.prepare(self.ctx.build_model(copy_none))
        r = Reader(self.encode_downlink(round_, 0), "evaluated downlink")
        received = read_values(r, self.layout, wire_dtype=self.wire_dtype,
                               chain=self.chains(round_, Direction.DOWN, 0), field="weights")
        r.finish()
        self.fill.receive(trainable_tensors(self._masked), received.tensors)
        return self._masked

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "aggregated": self.aggregated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.aggregated = int(state.get("aggregated", 0))

    def save_final(self, path: Path) -> None:
        save_pretrained(self.global_model(), path)


def _server(ctx: MethodContext) -> DenseServer:
    warn_if_plain_averaging_drifts(ctx.options)
    return FlascServer(ctx, partial(prepare, opts=ctx.options), flasc_chains(ctx.options))


def _client(ctx: MethodContext) -> DenseClient:
    return DenseClient(ctx, partial(prepare, opts=ctx.options), flasc_chains(ctx.options),
                       train_received_only=ctx.options.client_freeze, copied=copy_none)


register(
    MethodSpec(
        name="flasc",
        options=FlascOptions,
        server=_server,
        client=_client,
        summary="sparse federated LoRA (FLASC/CELLM): top-k weights down, top-k change up",
    )
)
