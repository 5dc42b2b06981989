"""FedCyBGD (Wang et al., arXiv 2406.11187): full-parameter tuning one block at a time.

A block is one decoder layer; the embeddings, the head and the final norm are never
trained. Each sampled client is assigned the next block of the cycle (``order``:
ascending, descending or random — a fresh permutation per cycle), trains only that
block and uploads only its change; the server overlays it on the global model.
``agg_clients`` = n assigns n clients to each block on purpose and averages their
changes (sample-weighted); the paper's ``agg`` is n = 2 (``agg = true`` is still read
as that). With one client per block, if two clients of a round hold the same block
the later slot wins.

Schedules (``schedule``):

* ``parallel`` (default): m clients a round train m / n blocks side by side, each
  from the model as the round began, each with a fresh local optimizer (as every
  other fedbits method): a round costs the same wall time as one client's.
* ``cycle`` (the paper): the clients train one after another. A round is one step of
  the cycle (``clients.per_round`` must equal ``agg_clients``): the k-th client (or
  group of n) trains block k mod L from the weights the previous one left, and its
  optimizer state travels with the block (:mod:`fedbits.methods._blocks.carry`): the
  downlink carries the block's moments and step count, the uplink brings them back
  updated, the server keeps them between clients and in its checkpoint. That costs
  AdamW's two moments (2 x the block in float32) both ways once a block has been
  trained, SGD with momentum one; the ledger counts them like any other byte. There is
  no learning-rate schedule to carry: clients train at a constant ``clients.lr`` and
  the step count is AdamW's whole position. A client that fails leaves its block's
  weights and state as they were; the cycle moves on.

Download (``download``):

* ``changed`` (default): the client keeps its copy of the decoder layers in its
  client store and receives only the blocks changed since its last sync, as exact
  values (the parameter dtype: a lossy downlink would make the copies drift). The
  server records each client's sync point, only when that client's uplink is
  verified; a client whose round failed gets every changed block next time.
* ``fraction``: as in the paper, the client starts from the pretrained weights plus
  a random fraction ``download_fraction`` of the blocks updated so far (the rest
  stay pretrained); its own block always comes down when it has been updated. No
  client state.

Whether optimizer state travels is the schedule's choice: ``parallel`` clients start
fresh (Adam's moments would triple a block's bytes in both directions, and clients
training side by side have no one state to continue), ``cycle`` clients continue it.

Downlink body: universe fingerprint u64 | slot u32 | since u32 | block bitmask
(ceil(L/8) bytes) | values of the sent blocks, concatenated (dtype u8, count u64, values)
[| cycle: the trained block's optimizer state]
Uplink body:   num_samples u32 | train_loss f32 | digest u64 of the block the client
started from [| cycle: the block's optimizer state after training] | the block's Δ
(fingerprint u64 + ``wire_dtype`` tensor or ``uplink`` chain payload)

The digest proves the change applies to the weights the server holds, so the
overlay w ← w + Δ is the client's trained block.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from fedbits.compress import Chain, parse_chain
from fedbits.config import Config, DType
from fedbits.errors import ClientError, ConfigError, WireError
from fedbits.frozen import copy_none, own
from fedbits.methods._blocks import (
    BlockSchedule,
    Cohort,
    Subset,
    decoder_layers,
    read_values,
    train_only,
    write_values,
)
from fedbits.methods._blocks.carry import BlockState, mean_state, moment_names, read_state
from fedbits.methods._blocks.subset import Order
from fedbits.methods._updates import (
    DeltaUpdate,
    check_change,
    load_tensors,
    narrow,
    save_pretrained,
    seeded_generator,
    tensors_state,
    train_change,
)
from fedbits.methods.base import (
    ClientData,
    ClientResult,
    ClientStore,
    ClientUpdate,
    MethodContext,
    MethodOptions,
    MethodSpec,
    refuse_float16_adamw,
)
from fedbits.methods.registry import register
from fedbits.robust import RobustAggregator
from fedbits.seeding import derive_seed
from fedbits.wire import Body, Layout, Reader, Writer
from fedbits.wire.codec import tensor_bytes, tensor_from_bytes
from fedbits.wire.layout import check_fingerprint

SYNCED_KEY = "fedcybgd-synced"


def block_key(block: int) -> str:
    return f"fedcybgd-block-{block}"


class FedCyBGDOptions(MethodOptions):
    privacy_refusal: ClassVar[str | None] = (
        "a block takes the change of the few clients that trained it (method.agg_clients), "
        "so the server releases one client's or a handful's update, not a mean over a "
        "sampled cohort whose noise the accountant covers")
    order: Order = Field("ascending", description="order in which a cycle visits the blocks")
    schedule: Literal["parallel", "cycle"] = Field(
        "parallel", description="parallel: a round's clients train different blocks side by "
        "side, fresh optimizers; cycle (paper): one block per round, each from the last "
        "client's weights, the optimizer state travelling with the block"
    )
    agg_clients: int = Field(1, ge=1, description="clients per block, their changes averaged")
    agg: bool = Field(False, description="the paper's agg mode, the same as agg_clients = 2")
    download: Literal["changed", "fraction"] = Field(
        "changed", description="changed: blocks changed since the client's last sync (it keeps a "
        "copy); fraction: pretrained + a random fraction of the updated blocks (paper)"
    )
    download_fraction: float = Field(0.5, gt=0, le=1, description="p, for download = 'fraction'")
    wire_dtype: DType = Field(
        "float32", description="value type of the uplink when no chain is set"
    )
    uplink: list[str] = Field(
        default_factory=list, description="codec chain for the block's change"
    )

    @property
    def per_block(self) -> int:
        """Clients per block: ``agg_clients``, or 2 for the old ``agg = true``."""
        return 2 if self.agg else self.agg_clients

    def check_config(self, cfg: Config) -> None:
        refuse_float16_adamw(cfg, "the model's decoder layers")
        cohort = cfg.clients_per_round()
        if self.schedule == "cycle" and cohort != self.per_block:
            raise ConfigError(
                f"method.schedule = 'cycle' trains one block per round, from the weights and "
                f"optimizer state the last round left: clients.per_round must equal "
                f"method.agg_clients ({self.per_block}), got {cohort} clients a round"
            )

    @model_validator(mode="after")
    def _chain_is_valid(self) -> FedCyBGDOptions:
        if self.uplink and self.wire_dtype != "float32":
            raise ValueError("set the value format in method.uplink or method.wire_dtype, not both")
        if self.agg and self.agg_clients not in (1, 2):
            raise ValueError("method.agg = true is the old spelling of agg_clients = 2: set "
                             f"only agg_clients (here {self.agg_clients})")
        parse_chain(self.uplink, field="method.uplink")
        return self


def block_digest(tensors: Iterable[torch.Tensor]) -> int:
    """64-bit BLAKE2b of the tensors' bytes, in order."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return int.from_bytes(h.digest(), "little")


@dataclass
class BlockUpdate(DeltaUpdate):
    slot: int
    block: int
    state: BlockState | None = None  # cycle: the block's optimizer state after training


class _Structure:
    """What both halves derive from the model: blocks, layouts, schedule. The model's
    decoder layers (the universe) become its own float32 copies; the embeddings, the
    head and the final norm stay the process's shared frozen base."""

    def __init__(self, ctx: MethodContext, model: nn.Module) -> None:
        opts: FedCyBGDOptions = ctx.options
        self.ctx, self.opts = ctx, opts
        names = [n for n, _ in model.named_parameters()]
        layers = decoder_layers(names, f"model {ctx.model_name!r}")
        schedule = BlockSchedule(len(layers), "client", opts.order, ctx.seed,
                                 ctx.cohort, per_block=opts.per_block)
        self.subset = Subset.build(names, [set(layer) for layer in layers], schedule)
        own(model, list(self.subset.universe), torch.float32)
        params = dict(model.named_parameters())
        self.layouts = [Layout.of({n: params[n] for n in block}) for block in self.subset.blocks]
        self.universe = Layout.of({n: params[n] for n in self.subset.universe})
        dtypes = {params[n].dtype for n in self.subset.universe}
        if len(dtypes) != 1:
            raise ValueError(f"fedcybgd needs one dtype across the decoder layers, got {dtypes}")
        self.dtype = dtypes.pop()
        self.num_blocks = len(layers)
        self.wire_dtype: torch.dtype = getattr(torch, opts.wire_dtype)
        self.up: Chain | None = (
            parse_chain(opts.uplink, field="method.uplink") if opts.uplink else None
        )
        self.cycle = opts.schedule == "cycle"
        self.moments = moment_names(ctx.clients)  # what travels in cycle mode

    def flat(self, params: Mapping[str, torch.Tensor], blocks: list[int]) -> torch.Tensor:
        parts = [params[n].detach().reshape(-1) for b in blocks for n in self.subset.blocks[b]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype)

    def mask_bytes(self, blocks: list[int]) -> bytes:
        bits = np.zeros(self.num_blocks, dtype=bool)
        bits[blocks] = True
        return np.packbits(bits, bitorder="little").tobytes()

    def read_mask(self, r: Reader) -> list[int]:
        raw = r.raw(math.ceil(self.num_blocks / 8), "blocks")
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
        if bits[self.num_blocks:].any():
            raise WireError(f"{r.what}: field blocks: bits set beyond the {self.num_blocks} blocks")
        return np.flatnonzero(bits[: self.num_blocks]).tolist()


class FedCyBGDServer:
    def __init__(self, ctx: MethodContext) -> None:
        self.model = ctx.build_model(copy_none)
        self.s = _Structure(ctx, self.model)
        train_only(self.model, ())  # the server never computes gradients
        all_params = dict(self.model.named_parameters())
        self.params = {n: all_params[n] for n in self.s.subset.universe}
        self.version = [0] * self.s.num_blocks  # the round whose aggregate last changed each block
        self.synced: dict[int, int] = {}  # client -> last aggregate its verified copy holds
        self.cohort = Cohort()
        self.robust = RobustAggregator(ctx.robust, ctx.device)
        self._since: dict[int, int] = {}  # this round: the sync point each client was sent from
        self.carry: dict[int, BlockState] = {}  # cycle: each trained block's optimizer state

    def downlink(self, round_: int, client: int) -> bytes:
        if self.cohort.round != round_:
            self._since = {}
        slot = self.cohort.assign(round_, client)
        block, _ = self.s.subset.select(round_, slot)
        if self.s.opts.download == "changed":
            # the record is dropped until this round's uplink verifies it again
            since = self._since.setdefault(client, self.synced.pop(client, 0))
            send = [b for b, v in enumerate(self.version) if v > since]
        else:
            since = 0
            send = self._sample(round_, client, block)
        w = Writer().u64(self.s.universe.fingerprint).u32(slot).u32(since)
        w.raw(self.s.mask_bytes(send))
        w.tensor(self.s.flat(self.params, send))
        if self.s.cycle:
            self.carry.get(block, BlockState()).write(w, self.s.moments)
        return w.getvalue()

    def _sample(self, round_: int, client: int, block: int) -> list[int]:
        """The client's own block if updated, plus a random fraction p of the other updated ones."""
        others = [b for b, v in enumerate(self.version) if v > 0 and b != block]
        k = math.ceil(self.s.opts.download_fraction * len(others) - 1e-9)
        seed = derive_seed(self.s.ctx.seed, "fedcybgd-download", round_, client)
        rng = random.Random(seed)
        chosen = set(rng.sample(others, k))
        if self.version[block] > 0:
            chosen.add(block)
        return sorted(chosen)

    def decode_uplink(self, round_: int, client: int, body: Body) -> BlockUpdate:
        sender = f"client {client} uplink"
        r = Reader(body, sender)
        slot = self.cohort.slot(round_, client, sender)
        block, names = self.s.subset.select(round_, slot)
        num_samples = r.u32("num_samples")
        train_loss = r.f32("train_loss")
        digest = r.u64("digest")
        state = None
        if self.s.cycle:
            state = read_state(r, self.s.moments, self.s.layouts[block].numel)
            sent, steps = self.carry.get(block, BlockState()).step, self.s.ctx.clients.local_steps
            if state.step != sent + steps:
                raise ClientError(f"{sender}: optimizer state after step {state.step}, but block "
                                  f"{block} went down at step {sent} to train {steps} steps")
        delta = read_values(r, self.s.layouts[block], wire_dtype=self.s.wire_dtype, chain=self.s.up,
                            field="delta")
        r.finish()
        check_change(sender, num_samples, train_loss, delta)
        if digest != block_digest(self.params[n] for n in names):
            raise ClientError(
                f"{sender}: trained block {block} from weights that differ from the server's "
                "(its copy is out of sync); it receives every changed block next time"
            )
        update = BlockUpdate(client, num_samples, train_loss, dict(delta), slot=slot, block=block,
                             state=state)
        self.robust.admit(round_, update)
        return update

    @torch.no_grad()
    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> dict[str, float]:
        blocks = narrow(updates, BlockUpdate)
        by_block: dict[int, list[BlockUpdate]] = {}
        for u in sorted(blocks, key=lambda u: u.slot):
            by_block.setdefault(u.block, []).append(u)
        # the last writer wins, unless agg_clients combines the group (as robust.aggregator
        # says)
        many = self.s.opts.per_block > 1
        writers = [u for group in by_block.values() for u in (group if many else group[-1:])]
        outcome = self.robust.combine(round_, writers, self.params)
        for name, change in outcome.changes.items():
            self.params[name].add_(change.to(self.s.dtype))
        updated = sorted({b for b in by_block if self.s.subset.blocks[b][0] in outcome.changes})
        for block in updated:
            self.version[block] = round_
            if self.s.cycle:  # the state goes on with the weights it trained
                self.carry[block] = mean_state([(u.state, float(u.num_samples)) for u in writers
                                                if u.block == block and u.state is not None])
        if self.s.opts.download == "changed":
            for u in blocks:  # its copy now holds every aggregate before this round
                self.synced[u.client] = round_ - 1
        return {"blocks_updated": len(updated), **outcome.stats}

    def global_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": tensors_state(self.params),
            "version": torch.tensor(self.version, dtype=torch.int64),
            "synced": torch.tensor(sorted(self.synced.items()), dtype=torch.int64).reshape(-1, 2),
            "robust": self.robust.state_dict(),
            "carry": {str(b): s.state_dict() for b, s in sorted(self.carry.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_tensors(self.params, state["params"])
        self.version = state["version"].tolist()
        self.synced = {int(c): int(s) for c, s in state["synced"].tolist()}
        self.robust.load_state_dict(state.get("robust", {}))
        self.carry = {int(b): BlockState.from_state_dict(s)
                      for b, s in state.get("carry", {}).items()}

    def save_final(self, path: Path) -> None:
        save_pretrained(self.model, path)


class FedCyBGDClient:
    """Rebuilds its model for every update (pretrained + the blocks in its store + what
    came down), as a device reading its weights from disk; nothing survives the call
    except what the client store holds. One working model serves every client this
    process simulates: the blocks the last update changed go back to their pretrained
    values first."""

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.model = ctx.build_model(copy_none)
        self.s = _Structure(ctx, self.model)
        self.params = dict(self.model.named_parameters())
        self.changed: set[int] = set()  # blocks that differ from the pretrained model
        self.received_state: BlockState | None = None  # cycle: what the last downlink held

    def update(
        self, round_: int, client: int, downlink: Body, data: ClientData, store: ClientStore
    ) -> ClientResult:
        if not data.items:
            raise ClientError(f"client {client} has no training data")
        model, slot, received = self.load(round_, client, downlink, store)
        block, names = self.s.subset.select(round_, slot)
        params = dict(model.named_parameters())
        trained = {n: params[n] for n in names}
        train_only(model, trained)
        digest = block_digest(trained.values())  # the block it starts from
        layout, start = self.s.layouts[block], self.received_state
        carried = (start.per_param(layout, self.ctx.clients, next(iter(trained.values())).device)
                   if start is not None else None)
        change = train_change(model, trained, data, self.ctx.clients, optimizer_state=carried)

        w = Writer().u32(data.claimed_samples).f32(change.loss).u64(digest)
        if start is not None and change.optimizer_state is not None:
            step = start.step + self.ctx.clients.local_steps
            BlockState.of_params(change.optimizer_state, layout, step,
                                 self.s.moments).write(w, self.s.moments)
        gen = seeded_generator(data.seed, "uplink")
        write_values(w, self.s.layouts[block], change.delta, wire_dtype=self.s.wire_dtype,
                     chain=self.s.up, generator=gen)
        return ClientResult(w.getvalue(), stats={
            "block": block, "blocks_received": received,
            "trained_params": self.s.layouts[block].numel,
            "train_seconds": change.seconds,
            "seconds_per_step": change.seconds / self.ctx.clients.local_steps,
        })

    @torch.no_grad()
    def load(
        self, round_: int, client: int, downlink: Body, store: ClientStore
    ) -> tuple[nn.Module, int, int]:
        """The model this downlink body stands for: pretrained, then the blocks in the
        store (``changed`` only), then the blocks that came down (kept in the store for
        next time). Returns it with the client's slot and the number of blocks received."""
        what = f"downlink to client {client}"
        r = Reader(downlink, what)
        check_fingerprint(r.u64("fingerprint"), self.s.universe, what)
        slot, since = r.u32("slot"), r.u32("since")
        sent = set(self.s.read_mask(r))
        count = sum(self.s.layouts[b].numel for b in sent)
        values = r.tensor("weights", count=count, dtype=self.s.dtype)
        block = self.s.subset.select(round_, slot)[0]
        self.received_state = (read_state(r, self.s.moments, self.s.layouts[block].numel)
                               if self.s.cycle else None)
        r.finish()
        keep = self.s.opts.download == "changed"
        if keep and since > 0:
            raw = store.get(SYNCED_KEY)
            held = int.from_bytes(raw, "little") if raw is not None else None
            if held != since:
                raise ClientError(
                    f"client {client}: its store holds the model as of round {held}, but the "
                    f"server sent the changes since round {since}"
                )
        model, params = self.model, self.params
        for b in sorted(self.changed):
            for name in self.s.subset.blocks[b]:
                params[name].copy_(self.ctx.base_tensor(name))
        self.changed = {block}  # the block it will train
        offset = 0
        for b, layout in enumerate(self.s.layouts):
            if b in sent:
                flat = values[offset : offset + layout.numel]
                offset += layout.numel
                if keep:
                    store.put(block_key(b), tensor_bytes(flat))
            elif keep and since > 0 and (raw := store.get(block_key(b))) is not None:
                if len(raw) != layout.numel * self.s.dtype.itemsize:
                    raise ClientError(f"client {client}: stored block {b} has {len(raw)} bytes, "
                                      "not one block of this model")
                flat = tensor_from_bytes(raw, self.s.dtype, layout.numel)
            else:
                continue  # still pretrained
            self.changed.add(b)
            for name, tensor in layout.unflatten(flat).items():
                params[name].copy_(tensor)
        if keep:
            store.put(SYNCED_KEY, (round_ - 1).to_bytes(4, "little"))
        return model, slot, len(sent)


register(
    MethodSpec(
        name="fedcybgd",
        options=FedCyBGDOptions,
        server=FedCyBGDServer,
        client=FedCyBGDClient,
        summary="FedCyBGD: each client trains and uploads one decoder layer, cycling; "
        "change-only or paper-style partial download",
    )
)
