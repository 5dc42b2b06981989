"""The method interface: a server half and a client half that meet only at bytes.

A method is registered as a :class:`MethodSpec`: its name, its options model (the
``[method]`` keys besides ``name``) and two factories. Its halves produce and consume
*bodies*: the runtime seals each body in the envelope (method, round, direction,
checksum), enforces ``runtime.max_payload_mb`` on both sides, records the sealed
bytes in the ledger, and never looks inside a body; the same two halves run in the
in-process simulator and on real nodes (docs/methods.md states the whole contract).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedbits.config import ClientsSection, Config, PrivacySection, RobustSection
from fedbits.errors import ConfigError
from fedbits.methods.injected import Injected
from fedbits.wire import Body

if TYPE_CHECKING:  # transformers loads only when a half is built, not to list methods
    from transformers import PreTrainedModel


class MethodOptions(BaseModel):
    """Base for a method's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    privacy_refusal: ClassVar[str | None] = (
        "its server does not clip client updates and noise their mean (fedbits.privacy)")
    """Why the method refuses a ``[privacy]`` section, or None where its server applies
    it; read by :meth:`privacy_refused` when the config loads."""

    @classmethod
    def privacy_refused(cls) -> str | None:
        """:attr:`privacy_refusal` as this options class itself declares it, never as it
        inherits it: a method built on another's options may do more with the clients'
        updates than that method's server (train on them, publish them), so it accepts
        ``[privacy]`` only where it says so."""
        return cls.__dict__.get("privacy_refusal", MethodOptions.privacy_refusal)

    def check_config(self, cfg: Config) -> None:
        """Refuse a combination of these options with the rest of ``cfg`` that cannot
        train (raise :class:`ConfigError` naming the keys), before any work starts.
        Runs after the options validate; most methods have nothing to check."""


def refuse_float16_adamw(cfg: Config, trained: str) -> None:
    """AdamW cannot train float16 weights in place: its eps (1e-8) and squared gradients
    underflow to zero in float16, the step turns NaN and every client's loss becomes
    non-finite in the first round. Methods whose clients train the model's own weights
    (``trained`` says which) call this; LoRA adapters are float32 whatever the model's
    dtype, and SGD keeps no second moment."""
    if cfg.model.dtype == "float16" and cfg.clients.optimizer == "adamw":
        raise ConfigError(
            f"model.dtype = 'float16' with clients.optimizer = 'adamw': {cfg.method.name} "
            f"trains {trained} in float16, where AdamW's steps underflow to NaN; set "
            "model.dtype to 'bfloat16' or 'float32' (or clients.optimizer = 'sgd')"
        )


@dataclass
class MethodContext:
    """What both halves of a method get from the runtime: the run settings a method may
    read, not the whole config, so no method can come to depend on data paths, output
    directories or the runtime's keys."""

    method: str  # the registered name the run uses (messages, store keys)
    options: Any  # the method's validated MethodOptions subclass
    seed: int  # run.seed: derive every random choice from it (fedbits.seeding)
    clients: ClientsSection  # local training: lr, local_steps, batch_size, optimizer, ...
    cohort: int  # clients sampled per round
    model_name: str  # model.name, for messages
    tokenizer: Any
    build_model: Callable[..., PreTrainedModel]
    """``build_model(copied=copy_all, master_dtype=torch.float32)``: the pretrained model
    in a module tree of its own. Parameters ``copied(name)`` says yes to are private
    copies (float32 master weights over a low-precision base); the rest alias the one
    frozen base of the process: frozen, never to be written (fedbits.frozen). The default
    copies everything, which is always safe; LoRA methods copy nothing."""
    base_tensor: Callable[[str], torch.Tensor]  # a parameter's pretrained value, read-only
    device: torch.device  # model.device resolved: where the halves compute
    # [robust]: how a server bounds what clients send (fedbits.robust); defended by default
    robust: RobustSection = field(default_factory=RobustSection)
    # run.rounds as this process started (a resume may raise it): for methods whose
    # schedule is a fraction of the run, such as cgfedllm's TGAP phase
    rounds: int = 0
    # [privacy]: client-level DP on the aggregate (fedbits.privacy); None: no section
    privacy: PrivacySection | None = None


@dataclass
class ClientData:
    """A client's local training data for one round, already tokenized."""

    items: list  # list[fedbits.data.format.Tokenized]
    pad_id: int
    seed: int  # derived from (run seed, round, client): fixes data order and dropout
    # what the simulator's [faults] make this client do wrong this round (nothing, as on
    # a real node); the shared client paths apply it, no method reads it itself
    injected: Injected = field(default_factory=Injected)

    @property
    def num_samples(self) -> int:
        return len(self.items)

    @property
    def claimed_samples(self) -> int:
        """The sample count a client half reports in its uplink: :attr:`num_samples`,
        unless an injected ``weight`` attack claims more."""
        return self.injected.claimed(self.num_samples)


@dataclass
class ClientUpdate:
    """A decoded, validated uplink. Methods subclass it to carry their payload."""

    client: int
    num_samples: int
    train_loss: float


@dataclass
class ClientResult:
    """What a client half returns: its uplink body and what it measured.

    ``stats`` land in ``metrics.jsonl`` under ``client_stats[client]`` (e.g. FedKSeed's
    replay time); they are reports, never inputs to aggregation, which sees only what
    the server decodes from ``body``.
    """

    body: bytes
    stats: dict[str, float] = field(default_factory=dict)


class ClientStore(Protocol):
    """Per-client state kept between rounds (memory in simulation, disk on a node)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


class ServerSide(Protocol):
    """The server half. Within a round the runtime calls :meth:`downlink` for every
    sampled client before it calls :meth:`decode_uplink` for any (the order rule), so
    a downlink never depends on another client's uplink of the same round."""

    def downlink(self, round_: int, client: int) -> bytes:
        """The body this client receives. Returning the same ``bytes`` object for every
        client of a round costs one copy in all: the runtime seals it once."""
        ...

    def decode_uplink(self, round_: int, client: int, body: Body) -> ClientUpdate:
        """Decode and validate an opened uplink body; raise WireError/ClientError to
        reject this client (the round goes on without it)."""
        ...

    def aggregate(self, round_: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """Fold the round's accepted updates into the global model (never called with
        none); return what the server measured, recorded as the round's ``server_stats``."""
        ...

    def global_model(self) -> nn.Module:
        """The current global model, for evaluation and export (materialize)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_final(self, path: Path) -> None: ...


class ClientSide(Protocol):
    def update(
        self, round_: int, client: int, downlink: Body, data: ClientData, store: ClientStore
    ) -> ClientResult:
        """Decode the downlink body, train locally, return the uplink body; raise to
        reject this client for the round."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: type[MethodOptions]
    server: Callable[[MethodContext], ServerSide]
    client: Callable[[MethodContext], ClientSide]
    summary: str = ""
    client_defaults: Mapping[str, Any] = field(default_factory=dict)
    """``[clients]`` values this method trains with unless the user sets them (FedKSeed's
    paper setting: lr 3e-7, τ 200, batch 1): the generic defaults (lr 1e-4, AdamW-sized
    steps) would make a zeroth-order method diverge or crawl. Applied when a config is
    loaded (:func:`fedbits.resolve.apply_client_defaults`); an explicit value always wins."""
