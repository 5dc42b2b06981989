"""Which parameters a client trains and uploads, for a given round and client slot.

A :class:`Subset` is a list of *blocks* (each a tuple of parameter names) and a
:class:`BlockSchedule` that picks one block for every (round, slot). Both halves of
a method build the same Subset from the same model, options and run seed, so the
server knows which tensors an uplink holds without a single name on the wire; the
only thing that travels is the client's slot, in the downlink.

Blocks come from decoder layers (:mod:`.layers`): explicit index ranges, or a
fraction of the layers placed at the top, the bottom or spread evenly, plus
parameters named by glob patterns. Schedules:

* ``fixed``: one block, every round, every client;
* ``round``: every client in a round trains the same block, the next round the next
  block (a cycle visits each block once, in ``order``);
* ``client``: each client in a round its own block, continuing the cycle across
  clients and rounds — the (r−1)·m + s-th assignment for slot s of m clients;
  ``per_block`` clients share each block (FedCyBGD's ``agg`` mode uses 2).

``order`` is ``ascending`` (layer 0 first), ``descending`` or ``random`` (a fresh
permutation per cycle, seeded by the run seed and the cycle number, so every block is
still visited exactly once per cycle).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field, ValidationInfo, field_validator
from torch import nn

from fedbits.errors import ClientError, ConfigError
from fedbits.methods._blocks.layers import decoder_layers, layer_of
from fedbits.methods._updates import seeded_generator

Placement = Literal["top", "bottom", "spread"]
ScheduleKind = Literal["fixed", "round", "client"]
Order = Literal["ascending", "descending", "random"]


@dataclass(frozen=True)
class BlockSchedule:
    """The block index for (round, slot): a pure function of the run seed and options."""

    num_blocks: int
    kind: ScheduleKind
    order: Order
    seed: int
    cohort: int  # clients per round, the stride of the ``client`` schedule
    per_block: int = 1

    def block(self, round_: int, slot: int) -> int:
        if self.kind == "fixed":
            return 0
        if self.kind == "round":
            step = round_ - 1
        else:
            step = (round_ - 1) * math.ceil(self.cohort / self.per_block) + slot // self.per_block
        cycle, position = divmod(step, self.num_blocks)
        return self.cycle_order(cycle)[position]

    def cycle_order(self, cycle: int) -> list[int]:
        n = self.num_blocks
        if self.order == "ascending":
            return list(range(n))
        if self.order == "descending":
            return list(range(n - 1, -1, -1))
        gen = seeded_generator(self.seed, "block-order", cycle)
        return torch.randperm(n, generator=gen).tolist()


@dataclass(frozen=True)
class Subset:
    """Blocks of parameter names (each in model order) and the schedule over them."""

    blocks: tuple[tuple[str, ...], ...]
    schedule: BlockSchedule
    universe: tuple[str, ...]  # every name some block holds, in model order

    @classmethod
    def build(
        cls, names: Sequence[str], blocks: Sequence[set[str]], schedule: BlockSchedule
    ) -> Subset:
        ordered = tuple(tuple(n for n in names if n in block) for block in blocks)
        union = set().union(*blocks)
        return cls(ordered, schedule, tuple(n for n in names if n in union))

    def select(self, round_: int, slot: int) -> tuple[int, tuple[str, ...]]:
        """(block index, its parameter names) for this round and slot."""
        block = self.schedule.block(round_, slot)
        return block, self.blocks[block]


def train_only(model: nn.Module, names: Collection[str]) -> list[nn.Parameter]:
    """Make exactly ``names`` trainable and return them. Frozen parameters get no
    gradient, so no optimizer state either, and backward stops below the lowest
    trained layer."""
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            chosen.append(p)
    if len(chosen) != len(names):
        raise ValueError(f"{len(names) - len(chosen)} of the names to train are not "
                         "parameters of the model")
    return chosen


class Cohort:
    """Each client's slot in the current round: the order in which downlinks were asked for.

    The runtime asks for the sampled clients' downlinks in sampled order, so slots
    are deterministic; a second request from the same client gets the same slot.
    """

    def __init__(self) -> None:
        self.round: int | None = None
        self.slots: dict[int, int] = {}

    def assign(self, round_: int, client: int) -> int:
        if round_ != self.round:
            self.round, self.slots = round_, {}
        return self.slots.setdefault(client, len(self.slots))

    def slot(self, round_: int, client: int, sender: str) -> int:
        if round_ != self.round or client not in self.slots:
            raise ClientError(
                f"{sender}: no downlink was sent to client {client} in round {round_}")
        return self.slots[client]


# ------------------------------------------------------------------------ options


class SubsetOptions(BaseModel):
    """The ``[method]`` keys that choose the trainable subset (mixed into a method's options)."""

    layers: list[int | str] | None = Field(
        None, description="decoder layers to train, e.g. [0, '4-7', -1] (negative: from the top); "
        "overrides layer_fraction"
    )
    layer_fraction: float = Field(
        0.25, ge=0, le=1, description="fraction of the decoder layers per block (rounded up); "
        "0 trains no layer, only `include`"
    )
    placement: Placement = Field(
        "top", description="fixed schedule: the top, bottom or evenly spread layers; cycling "
        "schedules: 'spread' interleaves the layers of a block, otherwise blocks are contiguous"
    )
    schedule: ScheduleKind = Field(
        "fixed", description="fixed: one block, every round and client; round: the next block "
        "each round; client: the next block for each client (docs/partial.md)"
    )
    order: Order = Field("ascending", description="order in which cycling schedules visit blocks")
    include: list[str] = Field(
        default_factory=list, validate_default=True,
        description="glob patterns of parameter names trained in every block as well, "
        "e.g. ['model.norm.*']"
    )
    exclude: list[str] = Field(
        default_factory=list, description="glob patterns of parameter names never trained, "
        "e.g. ['*.mlp.*']"
    )

    @field_validator("layers")
    @classmethod
    def _layers_parse(cls, v: list[int | str] | None) -> list[int | str] | None:
        if v is not None:
            if not v:
                raise ValueError("list at least one layer, or leave layers unset")
            for item in v:
                _layer_range(item, None)
        return v

    # field validators (not one model validator) so that the error names the key
    @field_validator("schedule")
    @classmethod
    def _schedule_needs_blocks(cls, v: ScheduleKind, info: ValidationInfo) -> ScheduleKind:
        chosen_layers = info.data.get("layers") is not None
        if v != "fixed" and (chosen_layers or info.data.get("layer_fraction") == 0):
            raise ValueError(
                f"schedule {v!r} cycles through blocks of layer_fraction of the layers: leave "
                "`layers` unset and layer_fraction above 0 (or use schedule 'fixed')"
            )
        return v

    @field_validator("include")
    @classmethod
    def _something_to_train(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("layers") is None and info.data.get("layer_fraction") == 0 and not v:
            raise ValueError("nothing to train: set layers, layer_fraction > 0 or include")
        return v


def _layer_range(item: int | str, num_layers: int | None) -> list[int]:
    """``3`` -> [3]; ``-1`` -> [N-1]; ``"4-7"`` -> [4..7]. Checked against N when known."""
    if isinstance(item, int):
        lo = hi = item
    else:
        parts = item.split("-")
        try:
            if len(parts) != 2:
                raise ValueError
            lo, hi = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"layer range {item!r}: expected 'first-last', e.g. '4-7'") from None
        if lo > hi:
            raise ValueError(f"layer range {item!r}: first is after last")
    if num_layers is None:
        return []
    if isinstance(item, int) and item < 0:
        lo = hi = num_layers + item
    if lo < 0 or hi >= num_layers:
        raise ConfigError(
            f"method.layers: {item!r} is outside the model's layers 0..{num_layers - 1}")
    return list(range(lo, hi + 1))


def _layer_blocks(opts: SubsetOptions, num_layers: int) -> list[list[int]]:
    """Decoder-layer indices per block."""
    if opts.layers is not None:
        return [sorted({i for item in opts.layers for i in _layer_range(item, num_layers)})]
    if opts.layer_fraction == 0:
        return [[]]
    k = max(1, math.ceil(opts.layer_fraction * num_layers - 1e-9))
    if opts.schedule == "fixed":
        if opts.placement == "top":
            return [list(range(num_layers - k, num_layers))]
        if opts.placement == "bottom":
            return [list(range(k))]
        return [[(2 * i + 1) * num_layers // (2 * k) for i in range(k)]]
    groups = math.ceil(num_layers / k)
    if opts.placement == "spread":
        return [[i for i in range(num_layers) if i % groups == g] for g in range(groups)]
    return [list(range(g * k, min((g + 1) * k, num_layers))) for g in range(groups)]


def _matching(names: Sequence[str], patterns: list[str], key: str) -> set[str]:
    out: set[str] = set()
    for pattern in patterns:
        hits = set(fnmatch.filter(names, pattern))
        if not hits:
            raise ConfigError(
                f"method.{key}: {pattern!r} matches no trainable parameter "
                f"(e.g. {', '.join(names[:3])}, ...; tied weights appear once, under the embedding)"
            )
        out |= hits
    return out


def subset_from_options(
    names: Sequence[str], opts: SubsetOptions, *, seed: int, cohort: int, model_name: str
) -> Subset:
    """The Subset that ``opts`` describes over the trainable parameters ``names``."""
    names = list(names)
    uses_layers = opts.layers is not None or opts.layer_fraction > 0
    num_layers = len(decoder_layers(names, model_name)) if uses_layers else 0
    extra = _matching(names, opts.include, "include")
    never = _matching(names, opts.exclude, "exclude")
    blocks = []
    for layers in _layer_blocks(opts, num_layers) if uses_layers else [[]]:
        chosen = set(layers)
        block = {n for n in names if layer_of(n) in chosen or n in extra} - never
        if not block:
            raise ConfigError(f"method: the block of layers {layers} has no parameter left to "
                              "train after `exclude`")
        blocks.append(block)
    schedule = BlockSchedule(len(blocks), opts.schedule, opts.order, seed, cohort)
    return Subset.build(names, blocks, schedule)
