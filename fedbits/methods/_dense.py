"""Dense-delta federated training, shared by ``fedavg`` and ``fedit``.

Both send the trainable tensors down and the client's change up, dense; they differ
only in which tensors are trainable (all weights, or LoRA adapters). That choice is
the ``prepare`` function each method passes in: composition, not a class tower.

Downlink body: trainable values (layout fingerprint + one flat tensor).
Uplink body:   num_samples u32 | train_loss f32 | Δ values (fingerprint + flat tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field
from torch import nn

from fedbits.data.batching import iterate_batches
from fedbits.errors import ClientError, WireError
from fedbits.methods.base import ClientData, ClientStore, ClientUpdate, MethodContext
from fedbits.server_opt import ServerOptOptions, apply_pseudo_gradient, make_server_optimizer
from fedbits.train import local_train, make_optimizer
from fedbits.wire import Direction, Layout, Reader, Writer, decode_message, encode_message
from fedbits.wire.layout import read_tensors, write_tensors

WireDtype = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DenseOptions(ServerOptOptions):
    wire_dtype: WireDtype = Field(
        "float32", description="value type on the wire, both directions"
    )


Prepare = Callable[[nn.Module], nn.Module]


def trainable_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters in a fixed order; tied weights appear once."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class DenseUpdate(ClientUpdate):
    delta: dict[str, torch.Tensor]


class _DenseHalf:
    """What both halves hold: the prepared model, its trainable tensors and their layout."""

    def __init__(self, ctx: MethodContext, prepare: Prepare) -> None:
        self.ctx = ctx
        self.name = ctx.cfg.method.name
        self.model = prepare(ctx.build_model())
        self.params = trainable_tensors(self.model)
        self.layout = Layout.of(self.params)
        self.wire_dtype = _DTYPES[ctx.options.wire_dtype]

    def _open(self, payload: bytes, round_: int, direction: Direction, sender: str) -> Reader:
        body = decode_message(
            payload,
            method=self.name,
            round_=round_,
            direction=direction,
            max_bytes=self.ctx.max_payload_bytes,
            sender=sender,
        )
        return Reader(body, sender)


class DenseServer(_DenseHalf):
    def __init__(self, ctx: MethodContext, prepare: Prepare) -> None:
        super().__init__(ctx, prepare)
        self.optimizer = make_server_optimizer(list(self.params.values()), ctx.options)

    def downlink(self, round_: int, client: int) -> bytes:
        w = Writer()
        write_tensors(w, self.layout, self.params, self.wire_dtype)
        return encode_message(self.name, round_, Direction.DOWN, w.getvalue())

    def decode_uplink(self, round_: int, client: int, payload: bytes) -> DenseUpdate:
        sender = f"client {client} uplink"
        r = self._open(payload, round_, Direction.UP, sender)
        num_samples = r.u32("num_samples")
        train_loss = r.f32("train_loss")
        delta = read_tensors(r, self.layout, self.wire_dtype, "delta")
        r.finish()
        if num_samples == 0:
            raise ClientError(f"{sender}: reports zero training samples")
        for name, d in delta.items():
            if not torch.isfinite(d).all():
                raise ClientError(f"{sender}: non-finite values in the update of {name}")
        return DenseUpdate(client, num_samples, train_loss, delta)

    @torch.no_grad()
    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> None:
        total = sum(u.num_samples for u in updates)
        means = []
        for name, p in self.params.items():
            acc = torch.zeros_like(p, dtype=torch.float32)
            for u in updates:
                acc.add_(u.delta[name].float(), alpha=u.num_samples / total)
            means.append(acc)
        apply_pseudo_gradient(self.optimizer, list(self.params.values()), means)

    def global_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, p in self.params.items():
            p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optimizer"])

    def save_final(self, path: Path) -> None:
        self.model.save_pretrained(path)


class DenseClient(_DenseHalf):
    """One working model, reused for every client this process simulates."""

    def update(
        self, round_: int, client: int, downlink: bytes, data: ClientData, store: ClientStore
    ) -> bytes:
        if not data.items:
            raise ClientError(f"client {client} has no training data")
        r = self._open(downlink, round_, Direction.DOWN, f"downlink to client {client}")
        received = read_tensors(r, self.layout, self.wire_dtype, "weights")
        r.finish()
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(received[name])
        start = {n: p.detach().clone() for n, p in self.params.items()}

        cfg = self.ctx.cfg.clients
        torch.manual_seed(data.seed)  # dropout
        gen = torch.Generator().manual_seed(data.seed)
        batches = iterate_batches(data.items, cfg.batch_size, cfg.local_steps, gen, data.pad_id)
        optimizer = make_optimizer(list(self.params.values()), cfg)
        loss = local_train(self.model, batches, optimizer)

        delta = {n: p.detach() - start[n] for n, p in self.params.items()}
        w = Writer().u32(data.num_samples).f32(loss)
        write_tensors(w, self.layout, delta, self.wire_dtype)
        return encode_message(self.name, round_, Direction.UP, w.getvalue())
