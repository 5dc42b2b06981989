"""FedKSeed's ``[method]`` options (the client's lr, τ and batch size are ``[clients]``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from fedbits.config import Config, DType
from fedbits.errors import ConfigError
from fedbits.methods.base import MethodOptions
from fedbits.methods.fedkseed.wire import EntryFormat, ScalarDtype

PAPER_CLIENTS: dict[str, float | int] = {"lr": 3e-7, "local_steps": 200, "batch_size": 1}
"""The paper's client setting (η, τ, batch), FedKSeed's ``[clients]`` defaults: the
generic lr 1e-4 is a first-order rate, far too large for a two-point estimate."""


class FedKSeedOptions(MethodOptions):
    privacy_refusal: ClassVar[str | None] = (
        "an update is τ zeroth-order seed scalars that every client replays, not a weight "
        "change; fedbits.privacy clips and noises weight changes, and noised scalars in the "
        "pool are not implemented or accounted for")
    num_seeds: int = Field(4096, ge=1, le=1 << 24, description="K, the candidate seed pool")
    eps: float = Field(5e-4, gt=0, description="perturbation scale ε of the two-point estimate")
    distribution: Literal["gaussian", "rademacher"] = Field(
        "gaussian", description="direction values: 4096-level Gaussian, or ±1"
    )
    wire: Literal["compact", "reference"] = Field(
        "compact", description="compact: bit-packed indices, quantised scalars; "
        "reference: the paper's 4-byte index + 4-byte float32 per entry"
    )
    scalar_dtype: ScalarDtype = Field("float16", description="uplink scalars (compact wire)")
    pool_dtype: DType = Field(
        "float16", description="downlink pool scalars (compact wire); the published pool "
        "defines the model, so it is what clients and server both replay"
    )
    zstd: bool = Field(True, description="entropy-code a section when that makes it smaller")
    client_replay: Literal["incremental", "full"] = Field(
        "incremental", description="incremental: a client process keeps its replay "
        "accumulator and replays only changed seeds; full: every client rebuilds from "
        "its base weights and its whole pool (a node that keeps nothing else)"
    )
    max_scalar: float = Field(
        1e6, gt=0, description="a client with an uplink scalar beyond ± this is rejected: a "
        "sanity cap; robust.scalar_bound clips each scalar to what recent rounds saw")
    grad_clip: float | None = Field(
        None, gt=0, description="skip a step whose loss gap |L+ - L-| exceeds this (the "
        "reference's --grad_clip, off by default there too): it sends no scalar, so replay "
        "skips it too; None: off")
    max_views: int = Field(
        4096, ge=1, le=1 << 20, description="the server remembers the pool it last sent this "
        "many clients (K float64 each) to send them only what changed; a client it forgot "
        "gets the whole pool, so server memory does not grow with the number of clients"
    )

    def check_config(self, cfg: Config) -> None:
        if cfg.clients.weight_decay > 0:
            raise ConfigError(
                f"clients.weight_decay = {cfg.clients.weight_decay:g}: {cfg.method.name}'s "
                "model is the base weights plus the seed pool's steps, which every node "
                "replays exactly from the pool alone; decay is not a function of the pool, so "
                "a client's decay would never reach the model (docs/fedkseed.md): set "
                "clients.weight_decay = 0")
        if cfg.robust.aggregator != "mean":
            raise ConfigError(
                f"robust.aggregator = {cfg.robust.aggregator!r} combines weight changes; "
                f"{cfg.method.name} sums seed scalars (its defences are robust.scalar_bound "
                "and robust.max_weight): use robust.aggregator = 'mean'")

    def uplink_format(self) -> EntryFormat:
        return EntryFormat(self.wire, self.scalar_dtype, self.zstd)

    def pool_format(self) -> EntryFormat:
        return EntryFormat(self.wire, self.pool_dtype, self.zstd)


class FedKSeedProOptions(FedKSeedOptions):
    privacy_refusal = FedKSeedOptions.privacy_refusal
    history_clip: float = Field(1000.0, gt=0, description="|scalar| clip for seed importance")
