"""Delta-based federated training, shared by ``fedavg``, ``fedit`` and ``flasc``.

All three send the trainable tensors down and the client's change up; they differ in
which tensors are trainable (all weights, or LoRA adapters) and in the codec chain
each direction goes through (none, or e.g. top-k + int8 + zstd). Both are functions
the method passes in: ``prepare`` and a :data:`ChainPlan` — composition, not a class
tower.

Downlink body: trainable tensors
Uplink body:   num_samples u32 | train_loss f32 | Δ tensors
Tensors travel as :mod:`fedbits.compress.tensors` writes them: the layout
fingerprint, then one flat tensor in ``wire_dtype`` when the direction has no chain,
else the chain's payload, which runs to the end of the body.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch
from pydantic import Field, model_validator
from torch import nn

from fedbits.compress import Chain, ErrorFeedback, parse_chain
from fedbits.compress.tensors import Received, read_values, write_values
from fedbits.config import DType
from fedbits.errors import ClientError
from fedbits.frozen import Copied, copy_all
from fedbits.methods._updates import (
    DeltaUpdate,
    DownlinkFill,
    RoundSum,
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
    MethodOptions,
)
from fedbits.privacy import ClientLevelDP
from fedbits.robust import RobustAggregator
from fedbits.server_opt import (
    ServerOptName,
    ServerOptOptions,
    apply_pseudo_gradient,
    make_server_optimizer,
)
from fedbits.wire import Body, Direction, Layout, Reader, Writer

WireDtype = DType
DownlinkBase = Literal["zero", "init"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


ADAPTIVE_SERVER_LR = 1e-3
"""The default ``server_lr`` of the adaptive server rules (FLASC's FedAdam setting)."""


def default_server_lr(server_opt: ServerOptName) -> float:
    """The rate a server optimizer gets when the user sets none.

    Averaging and FedAvgM scale the mean change, so 1.0 applies it as it came (FedAvg).
    FedAdam, FedYogi and FedAdagrad normalise it per weight and move every weight by
    about ``server_lr`` per round whatever the change's size: at 1.0 that is far beyond
    a client's own steps and the model diverges (eval loss 5.6 -> 30.7 with fedadam)."""
    return 1.0 if server_opt in ("avg", "fedavgm") else ADAPTIVE_SERVER_LR


class DenseOptions(MethodOptions, ServerOptOptions):
    sparsifies_uplink: ClassVar[bool] = False  # True where the method adds its own top-k
    # server_opt and server_beta2 are ServerOptOptions' own, restated to carry a description
    server_opt: ServerOptName = Field(
        "avg", description="the server's rule on the mean change: plain averaging, FedAvgM, "
        "FedAdam, FedYogi or FedAdagrad (docs/partial.md)"
    )
    server_lr: float = Field(
        1.0, gt=0, description="the server optimizer's rate; unset, it follows server_opt: "
        f"1.0 for avg and fedavgm, {ADAPTIVE_SERVER_LR:g} for the adaptive rules"
    )
    server_beta2: float = Field(
        0.99, ge=0, lt=1, description="the adaptive rules' second-moment decay"
    )
    wire_dtype: WireDtype = Field(
        "float32", description="value type on the wire, both directions, when no chain is set"
    )
    uplink: list[str] = Field(
        default_factory=list,
        description="codec chain for the client's change, e.g. ['topk:1/16', 'int8', 'zstd']",
    )
    downlink: list[str] = Field(
        default_factory=list, description="codec chain for the weights sent down"
    )
    error_feedback: bool = Field(
        False,
        description="the client adds what its uplink chain dropped last time to its next change",
    )
    downlink_base: DownlinkBase = Field(
        "zero",
        description="'zero': the weights go down and what a sparse chain leaves out is zero; "
        "'init': the change since the initial weights (which every client rebuilds from the "
        "seed) goes down and what is left out keeps its initial value",
    )

    @model_validator(mode="before")
    @classmethod
    def _server_lr_follows_server_opt(cls, data: Any) -> Any:
        """Fill in the unset ``server_lr`` from the server optimizer (the method's default
        one when that is unset too); a rate the user gives always wins."""
        if isinstance(data, dict) and "server_lr" not in data:
            server_opt = data.get("server_opt", cls.model_fields["server_opt"].default)
            if server_opt in get_args(ServerOptName):  # else the field reports the bad name
                return {**data, "server_lr": default_server_lr(server_opt)}
        return data

    @model_validator(mode="after")
    def _chains_are_valid(self) -> DenseOptions:
        for field in ("uplink", "downlink"):
            stages = getattr(self, field)
            if stages and self.wire_dtype != "float32":
                raise ValueError(
                    f"set the value format in method.{field} or method.wire_dtype, not both")
            parse_chain(stages, field=f"method.{field}")
        if self.error_feedback and not (self.uplink or self.sparsifies_uplink):
            raise ValueError("method.error_feedback needs a lossy method.uplink chain")
        return self


Prepare = Callable[[nn.Module], nn.Module]
ChainPlan = Callable[[int, Direction, int], "Chain | None"]
"""The codec chain for (round, direction, client); None sends plain ``wire_dtype``
values. The client is there for per-client chains (FLASC's density tiers): a downlink
chain must not depend on it, as one body is encoded per round for the whole cohort."""


def chains_from_options(opts: DenseOptions) -> ChainPlan:
    """The fixed per-direction chains of ``method.uplink`` / ``method.downlink``."""
    up = parse_chain(opts.uplink, field="method.uplink") if opts.uplink else None
    down = parse_chain(opts.downlink, field="method.downlink") if opts.downlink else None
    return lambda round_, direction, client: up if direction == Direction.UP else down


def trainable_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters in a fixed order; tied weights appear once."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class _DenseHalf:
    """What both halves hold: the prepared model, its trainable tensors and their layout.

    ``copied``: the base weights this method trains and so needs copies of (all of them
    for FedAvg; none for LoRA, whose adapters are its own): the rest is the process's
    one frozen base, shared by the server and client halves."""

    def __init__(
        self, ctx: MethodContext, prepare: Prepare, chains: ChainPlan | None = None,
        copied: Copied = copy_all,
    ) -> None:
        self.ctx = ctx
        self.name = ctx.method
        self.model = prepare(ctx.build_model(copied))
        self.params = trainable_tensors(self.model)
        self.layout = Layout.of(self.params)
        self.wire_dtype = _DTYPES[ctx.options.wire_dtype]
        self.chains = chains or chains_from_options(ctx.options)
        self.fill = DownlinkFill(ctx.options.downlink_base, self.params)


class DenseServer(_DenseHalf):
    def __init__(
        self, ctx: MethodContext, prepare: Prepare, chains: ChainPlan | None = None,
        copied: Copied = copy_all,
    ) -> None:
        super().__init__(ctx, prepare, chains, copied)
        self.optimizer = make_server_optimizer(list(self.params.values()), ctx.options)
        self.round_sum = RoundSum(self.params)  # the mean's changes, folded as they arrive
        self.robust = RobustAggregator(ctx.robust, ctx.device)
        self.privacy = ClientLevelDP.of(ctx.privacy, ctx.seed, ctx.device)
        # (round, body, clients served): every client of a round gets the same object,
        # encoded (and sealed by the runtime) once; dropped once the whole cohort has it,
        # so the server does not hold a copy of the weights beside the sealed payload
        self._sent: tuple[int, bytes, int] | None = None

    def downlink(self, round_: int, client: int) -> bytes:
        if self._sent is None or self._sent[0] != round_:
            self._sent = (round_, self.encode_downlink(round_, client), 0)
        _, body, served = self._sent
        self._sent = (round_, body, served + 1)
        if served + 1 >= self.ctx.cohort:
            self._sent = None  # a later request this round encodes the same bytes again
        return body

    def encode_downlink(self, round_: int, client: int) -> bytes:
        """The downlink body of ``round_`` from the current weights, encoded afresh."""
        w = Writer()
        gen = seeded_generator(self.ctx.seed, "downlink", round_)
        write_values(w, self.layout, self.fill.to_send(self.params), wire_dtype=self.wire_dtype,
                     chain=self.chains(round_, Direction.DOWN, client), generator=gen)
        return w.getvalue()

    def decode_uplink(self, round_: int, client: int, body: Body) -> DeltaUpdate:
        """The client's change, checked and bounded (``[robust]``, then clipped by
        ``[privacy]``), then folded into the round's sum at once, or held for an
        order-statistic aggregator; the update returned carries its weight and loss, not
        the change."""
        update = self.read_change(round_, client, body)
        self.robust.admit(round_, update)
        if self.privacy is not None:
            self.privacy.clip(round_, update.delta)
        if self.robust.streams:
            self.round_sum.add(round_, update)
        else:
            self.robust.hold(update)
        return DeltaUpdate(update.client, update.num_samples, update.train_loss, {})

    def read_change(self, round_: int, client: int, body: Body) -> DeltaUpdate:
        """Decode and check an uplink body without folding it in (for inspection)."""
        sender = f"client {client} uplink"
        r = Reader(body, sender)
        num_samples = r.u32("num_samples")
        train_loss = r.f32("train_loss")
        delta = read_values(r, self.layout, wire_dtype=self.wire_dtype,
                            chain=self.chains(round_, Direction.UP, client), field="delta").tensors
        r.finish()
        check_change(sender, num_samples, train_loss, delta)
        return DeltaUpdate(client, num_samples, train_loss, delta)

    @torch.no_grad()
    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """One server step on the round's combined change (noised by ``[privacy]``),
        unless a defence refused it."""
        deltas = narrow(updates, DeltaUpdate)
        if self.robust.streams:
            outcome = self.robust.streamed(round_, deltas, self.round_sum.means(round_, deltas))
        else:
            outcome = self.robust.combine(round_, self.robust.held_for(deltas), self.params)
        if outcome.changes and self.privacy is not None:  # every client sends every tensor
            outcome.stats.update(self.privacy.release_(
                round_, outcome.changes, dict.fromkeys(self.params, len(deltas)),
                dict.fromkeys(self.params, self.ctx.cohort), self.params))
        if outcome.changes:
            apply_pseudo_gradient(self.optimizer, list(self.params.values()),
                                  [outcome.changes[name] for name in self.params])
        self._sent = None
        return outcome.stats

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

    def save_final(self, path: Path) -> None:
        save_pretrained(self.model, path)


class DenseClient(_DenseHalf):
    """One working model, reused for every client this process simulates.

    ``train_received_only``: with a sparse downlink, train only the positions that
    came down and keep the rest where the download left them (zero, or the initial
    value with ``downlink_base = "init"``): the pruning-style sparse-LoRA baseline.
    """

    def __init__(
        self, ctx: MethodContext, prepare: Prepare, chains: ChainPlan | None = None,
        train_received_only: bool = False, copied: Copied = copy_all,
    ) -> None:
        super().__init__(ctx, prepare, chains, copied)
        self.train_received_only = train_received_only

    def update(
        self, round_: int, client: int, downlink: Body, data: ClientData, store: ClientStore
    ) -> ClientResult:
        if not data.items:
            raise ClientError(f"client {client} has no training data")
        received, sent_indices = self._received(round_, client, downlink)
        self.fill.receive(self.params, received)
        del received  # a copy of the weights: not held through training
        after_step = None
        if self.train_received_only and sent_indices is not None:
            after_step = self._keep_only(sent_indices)

        def start() -> dict[str, torch.Tensor]:  # the downlink again, not a copy held
            return self.fill.values(self.params, self._received(round_, client, downlink).tensors)

        change = train_change(self.model, self.params, data, self.ctx.clients, after_step, start)

        w = Writer().u32(data.claimed_samples).f32(change.loss)
        chain = self.chains(round_, Direction.UP, client)
        feedback = None
        if chain is not None and self.ctx.options.error_feedback:
            feedback = ErrorFeedback(store, f"{self.name}-residual", self.layout.numel)
        up_gen = seeded_generator(data.seed, "uplink")
        write_values(w, self.layout, change.delta, wire_dtype=self.wire_dtype, chain=chain,
                     generator=up_gen, feedback=feedback)
        del change  # the change, before its bytes are joined into the body
        return ClientResult(w.getvalue())

    def _received(self, round_: int, client: int, downlink: Body) -> Received:
        r = Reader(downlink, f"downlink to client {client}")
        received = read_values(r, self.layout, wire_dtype=self.wire_dtype,
                               chain=self.chains(round_, Direction.DOWN, client), field="weights")
        r.finish()
        return received

    def _keep_only(self, indices: torch.Tensor) -> Callable[[], None]:
        """A step hook that puts every trainable position not in ``indices`` back to its
        downloaded value (zero, or the initial value)."""
        flat = torch.zeros(self.layout.numel, dtype=torch.bool, device=self.ctx.device)
        flat[indices.to(self.ctx.device)] = True
        masks = self.layout.unflatten(flat)

        def reset_the_rest() -> None:
            for name, p in self.params.items():
                self.fill.reset_unsent(name, p, masks[name])

        return reset_the_rest
