"""FedProx (Li et al., 2020) as a fedbits plugin, written from docs/methods.md alone.

Clients run ``clients.local_steps`` SGD steps on their loss plus ``mu/2 * ||w - w_t||²``
(the proximal term keeps heterogeneous clients near the global weights ``w_t``) and send
their change; the server applies the sample-weighted mean change. Every weight travels
as float32 both ways.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from fedbits.data.batching import iterate_batches
from fedbits.errors import ClientError
from fedbits.methods import (
    ClientData,
    ClientResult,
    ClientStore,
    ClientUpdate,
    MethodContext,
    MethodOptions,
    MethodSpec,
    register,
)
from fedbits.wire import Layout, Reader, Writer, read_tensors, write_tensors


class ProxOptions(MethodOptions):
    mu: float = Field(0.01, ge=0, description="weight of the proximal term mu/2 ||w - w_t||^2")


@dataclass
class Change(ClientUpdate):
    delta: dict[str, torch.Tensor]


class Half:
    def __init__(self, ctx: MethodContext) -> None:
        self.ctx, self.model = ctx, ctx.build_model()
        self.params = dict(self.model.named_parameters())
        self.layout = Layout.of(self.params)


class Server(Half):
    sent: tuple[int, bytes] | None = None

    def downlink(self, round_: int, client: int) -> bytes:
        if self.sent is None or self.sent[0] != round_:
            w = Writer()
            write_tensors(w, self.layout, self.params, torch.float32)
            self.sent = (round_, w.getvalue())
        return self.sent[1]

    def decode_uplink(self, round_: int, client: int, body: bytes) -> Change:
        r = Reader(body, f"client {client} uplink")
        samples, loss = r.u32("num_samples"), r.f32("train_loss")
        delta = read_tensors(r, self.layout, torch.float32, "delta")
        r.finish()
        if samples == 0 or not all(d.isfinite().all() for d in delta.values()):
            raise ClientError(f"client {client} uplink: no samples, or a non-finite change")
        return Change(client, samples, loss, delta)

    @torch.no_grad()
    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> dict[str, float]:
        total = sum(u.num_samples for u in updates)
        for name, p in self.params.items():
            p.add_(sum(u.delta[name] * (u.num_samples / total) for u in updates))
        return {}

    def global_model(self) -> torch.nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, p in self.params.items():
            p.copy_(state[name])

    def save_final(self, path: Path) -> None:
        self.model.save_pretrained(path)


class Client(Half):
    def update(self, round_: int, client: int, downlink: bytes, data: ClientData,
               store: ClientStore) -> ClientResult:
        r = Reader(downlink, f"downlink to client {client}")
        start = read_tensors(r, self.layout, torch.float32, "weights")
        r.finish()
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(start[name])
        cfg, mu = self.ctx.clients, self.ctx.options.mu
        opt = torch.optim.SGD(self.params.values(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(data.seed)
        self.model.eval()  # no dropout: the run depends on the seed and the weights only
        losses = []
        for batch in iterate_batches(data.items, cfg.batch_size, cfg.local_steps, gen,
                                     data.pad_id):
            loss = self.model(**batch).loss
            prox = sum(((p - start[n]) ** 2).sum() for n, p in self.params.items())
            opt.zero_grad()
            (loss + mu / 2 * prox).backward()
            opt.step()
            losses.append(loss.item())
        delta = {n: p.detach() - start[n] for n, p in self.params.items()}
        w = Writer().u32(data.num_samples).f32(sum(losses) / max(len(losses), 1))
        write_tensors(w, self.layout, delta, torch.float32)
        return ClientResult(w.getvalue(), stats={"steps": float(len(losses))})


register(MethodSpec(name="fedprox", options=ProxOptions, server=Server, client=Client,
                    summary="FedProx: local SGD with a proximal term, mean change (plugin)"))
