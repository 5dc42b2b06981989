"""Weight changes, written once for every method that sends them.

``fedavg``, ``fedit``, ``flasc``, ``partial`` and ``fedcybgd`` clients train some
tensors and send their change; the servers refuse a change that cannot be trusted,
bound what the rest may contribute (``[robust]``, :mod:`fedbits.robust`), combine them
and keep their tensors in checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn

from fedbits.config import ClientsSection
from fedbits.errors import ClientError
from fedbits.memory import release_freed_memory
from fedbits.methods.base import ClientData, ClientUpdate
from fedbits.seeding import derive_seed
from fedbits.train import (
    ParamState,
    StepInBackward,
    gradient_checkpointing,
    local_train,
    make_optimizer,
    optimizer_states,
)


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A torch generator seeded from ``parts`` by :func:`~fedbits.seeding.derive_seed`,
    as the runtime derives its seeds, so both halves, on any node, draw the same
    positions and orders."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass
class LocalChange:
    """What one client's local training produced."""

    delta: dict[str, torch.Tensor]  # trained tensor after minus before, by name
    loss: float  # mean training loss
    seconds: float  # time in the training loop
    # by name, the optimizer state training ended with: only when it was asked to travel
    optimizer_state: dict[str, ParamState] | None = None


def train_change(
    model: nn.Module, trained: Mapping[str, nn.Parameter], data: ClientData, cfg: ClientsSection,
    after_step: Callable[[], None] | None = None,
    start: Callable[[], dict[str, torch.Tensor]] | None = None,
    optimizer_state: Mapping[str, ParamState] | None = None,
) -> LocalChange:
    """Train ``trained`` (the caller froze the rest) on the client's batches for this
    round with a fresh optimizer; the data seed fixes batch order and dropout, so every
    runtime computes the same change.

    ``start`` rebuilds the values training started from, as fresh tensors, once it is
    over: a client that can decode its downlink again holds no copy of what it trains
    through training. Without it they are copied before training starts.

    ``optimizer_state``: for a method whose optimizer state travels (FedCyBGD's
    ``cycle``), the state to continue from, by trained name (a missing or empty entry
    starts fresh); the state training ended with is then returned in the change.
    Without it (every other method) the optimizer is fresh and its state dropped.

    Faults the simulator injects (``data.injected``) strike here, so every method that
    sends a change meets them alike: a crash after one of the steps, a value attack on
    the change."""
    # heavy: imported where used (fedbits.methods)
    from fedbits.data.batching import iterate_batches

    before = {} if start is not None else {n: p.detach().clone() for n, p in trained.items()}
    torch.manual_seed(data.seed)  # dropout
    batches = iterate_batches(data.items, cfg.batch_size, cfg.local_steps,
                              torch.Generator().manual_seed(data.seed), data.pad_id)
    began = time.perf_counter()
    gradient_checkpointing(model, cfg.gradient_checkpointing)
    params = list(trained.values())
    after_step = data.injected.crash_hook(after_step)
    states = None if optimizer_state is None else [optimizer_state.get(n, {}) for n in trained]
    ended: list[ParamState] | None = None
    # the optimizer state (two tensors per trained one for AdamW) is gone before the delta
    if _step_in_backward(model, params, cfg):
        with StepInBackward(params, cfg, states) as stepper:
            loss = local_train(model, batches, None, after_step=after_step)
            ended = stepper.states() if states is not None else None
    else:
        optimizer = make_optimizer(params, cfg, states)
        loss = local_train(model, batches, optimizer, after_step=after_step)
        ended = optimizer_states(optimizer, params) if states is not None else None
        del optimizer
    seconds = time.perf_counter() - began
    release_freed_memory()  # the optimizer state, before the change is built
    initial = start() if start is not None else before
    # after minus before, in the buffers of "before": no third copy of what trained
    delta = {n: initial.pop(n).neg_().add_(p.detach()) for n, p in trained.items()}
    for d in delta.values():
        data.injected.tamper(d)
    carried = None if ended is None else dict(zip(trained, ended, strict=True))
    return LocalChange(delta, loss, seconds, carried)


def _step_in_backward(model: nn.Module, params: list[nn.Parameter], cfg: ClientsSection) -> bool:
    """``clients.optimizer_in_backward``; "auto" steps in backward when the trained
    tensors are a quarter of the model or more. Their gradients then cost memory (a
    model's worth for FedAvg), while for a LoRA adapter they are small and stepping
    during backward only interleaves the optimizer state with the activations in the
    allocator's heaps (measured: 0.2x the model more peak RSS on smollm2 with fedit)."""
    if cfg.optimizer_in_backward != "auto":
        return cfg.optimizer_in_backward
    trained = sum(p.numel() for p in params)
    return 4 * trained >= sum(p.numel() for p in model.parameters())


@dataclass
class DeltaUpdate(ClientUpdate):
    """A client's change to the tensors it trained (all of them, or its block)."""

    delta: dict[str, torch.Tensor]


def check_change(
    sender: str, num_samples: int, train_loss: float, delta: Mapping[str, torch.Tensor]
) -> None:
    """Refuse an update that claims no samples (it would divide the average by zero),
    reports a loss that is not a number (a client whose training diverged, or a claim
    that would make the round's train_loss NaN) or carries NaN/inf (it would poison the
    global model)."""
    if num_samples == 0:
        raise ClientError(f"{sender}: reports zero training samples")
    if not math.isfinite(train_loss):
        raise ClientError(f"{sender}: reports train_loss {train_loss}, not a finite number")
    for name, d in delta.items():
        if not torch.isfinite(d).all():
            raise ClientError(f"{sender}: non-finite values in the update of {name}")


U = TypeVar("U", bound=ClientUpdate)


def narrow(updates: Sequence[ClientUpdate], kind: type[U]) -> list[U]:
    """``updates`` as the type this method's ``decode_uplink`` made them: the runtime
    hands back exactly what it returned, typed as the interface's base class."""
    out = [u for u in updates if isinstance(u, kind)]
    if len(out) != len(updates):
        raise TypeError(f"aggregate expects {kind.__name__} updates, from decode_uplink")
    return out


def save_pretrained(model: nn.Module, path: Path) -> None:
    """Write ``model`` in Hugging Face format: a transformers model its weights, a PEFT
    model its adapter. Both have ``save_pretrained``; ``build_model`` types them as
    plain modules, whose attributes read as tensors or submodules."""
    cast(Callable[[Path], None], model.save_pretrained)(path)


class RoundSum:
    """The weighted sum of a round's changes, folded in as each uplink is decoded; an
    update's weight is its ``num_samples``, the claim as :mod:`fedbits.robust` bounds it.

    A round then holds one float32 accumulator per trained tensor, not every client's
    change: with FedAvg on a 1B model and ten clients a round, 4 GB instead of 44 GB.
    The runtime aggregates exactly the updates it decoded (an update is accepted once
    ``decode_uplink`` returns), which :meth:`means` checks."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.params = params
        self.round: int | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}  # per tensor: the samples of the clients that sent it
        self.clients: set[int] = set()

    @torch.no_grad()
    def add(self, round_: int, update: DeltaUpdate) -> None:
        if self.round != round_:  # a new round (or one redone after a crash)
            self.round, self.sums, self.samples, self.clients = round_, {}, {}, set()
        for name, d in update.delta.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros_like(self.params[name], dtype=torch.float32)
                self.samples[name] = 0
            self.sums[name].add_(d.to(self.sums[name].device, torch.float32),
                                 alpha=float(update.num_samples))
            self.samples[name] += update.num_samples
        self.clients.add(update.client)

    def means(self, round_: int, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Per tensor, the sample-weighted mean change of the clients that sent it; the
        round's accumulators are handed over (the next round starts afresh)."""
        if self.round != round_ or self.clients != {u.client for u in updates}:
            raise RuntimeError(f"round {round_}: aggregate got other updates than the "
                               "uplinks decoded (the runtime aggregates what it decoded)")
        out = {n: total.div_(self.samples[n]) for n, total in self.sums.items()}
        self.round, self.sums, self.samples, self.clients = None, {}, {}, set()
        return out


def tensors_state(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """A checkpointable copy of the server's tensors."""
    return {n: p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def load_tensors(params: Mapping[str, nn.Parameter], saved: Mapping[str, Any]) -> None:
    """Overwrite the server's tensors in place from :func:`tensors_state`."""
    for n, p in params.items():
        p.copy_(saved[n])


def optimizer_checkpoint(
    params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """A server's tensors and its server optimizer's state, for the run's checkpoint."""
    return {"params": tensors_state(params), "optimizer": optimizer.state_dict()}


def load_optimizer_checkpoint(
    params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Restore :func:`optimizer_checkpoint` in place: a resumed run continues bit for bit."""
    load_tensors(params, state["params"])
    optimizer.load_state_dict(state["optimizer"])


class DownlinkFill:
    """What a client has where a sparse downlink sent nothing (``method.downlink_base``).

    ``"zero"``: the weights go down and what is left out is zero (FLASC). ``"init"``:
    the change since the initial weights goes down and what is left out keeps its
    initial value. Both sides rebuild the initial weights from the seed, so they cost
    no bytes, and a sparse downlink no longer zeroes most of a pretrained matrix or a
    LoRA A (which starts random, so a top-k of |w| is almost all A for many rounds).
    ``"init"`` keeps one copy of the trainable tensors on each side.
    """

    def __init__(self, base: str, params: Mapping[str, torch.Tensor]) -> None:
        self.initial = (
            {n: p.detach().clone() for n, p in params.items()} if base == "init" else None
        )

    def to_send(self, params: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if self.initial is None:
            return params
        return {n: p.detach() - self.initial[n] for n, p in params.items()}

    @torch.no_grad()
    def receive(
        self, params: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
    ) -> None:
        for name, p in params.items():
            p.copy_(received[name])
            if self.initial is not None:
                p.add_(self.initial[name])

    @torch.no_grad()
    def values(
        self, params: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """What :meth:`receive` puts into ``params``, bit for bit, in ``received``'s
        buffers where it can (decoded for this call: the caller's to overwrite)."""
        out = {n: received[n].to(p.device, p.dtype) for n, p in params.items()}
        if self.initial is not None:
            for name, value in out.items():
                value.add_(self.initial[name])
        return out

    @torch.no_grad()
    def reset_unsent(self, name: str, p: torch.Tensor, sent: torch.Tensor) -> None:
        """Put the positions of ``p`` outside the boolean mask ``sent`` back to their fill."""
        if self.initial is None:
            p.masked_fill_(~sent, 0.0)
        else:
            p.copy_(torch.where(sent, p, self.initial[name]))
