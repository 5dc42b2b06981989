"""A data holder's own settings: which client it is, its data, and the runs it accepts.

A SuperNode serves one data holder, and the holder decides, not the server:

- **its data**: ``fedbits-data``, a data file, folder or spec on this machine, in any
  form ``data.source`` takes (:func:`~fedbits.data.examples.load_examples`). The node
  trains on all of it as client ``client-id`` and counts its samples itself; no data
  path a run names is ever opened. A node started with ``partition-id`` instead is the
  shared-source demo: it loads the run's ``data.source`` and keeps partition N of it,
  as the simulator would (tests and one-machine trials only; it warns so).
- **its pins**: the models (``fedbits-allow-model``: a name, a path, or a path with the
  sha256 of its weights), methods (``fedbits-allow-method``) and most rounds
  (``fedbits-max-rounds``) it accepts. A run asking for anything else is refused, every
  reason named in one message that goes back to the server as the node's reply error
  and into the node's own log. ``fedbits-max-payload-mb`` bounds every payload the
  node receives or sends, below the run's own limit.

These are keys of the node config Flower hands the ClientApp (``flower-supernode
--node-config``, a TOML file ``fedbits flower supernode`` writes into the node
directory), which the worker reads too. Flower's node config holds scalars only, so a
list of pins is one string with one pin per line.

The run config a server sends is hostile input here (:func:`accept_run`): bounded in
size, read for its structure first and checked against the pins; only then are the
names it uses looked up, so a path the server names is never touched unless the
holder pinned it. This module imports no torch: the ClientApp uses it for every
message.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedbits.config import Config
from fedbits.errors import FedbitsError
from fedbits.resolve import validate_references
from fedbits.runtime.flower.protocol import parse_config

NODE_CONFIG = "node-config.toml"  # in the node directory: Flower's --node-config, the worker's
PARTITION_KEY = "partition-id"  # the shared-source demo: partition N of the run's data.source
CLIENT_KEY = "client-id"  # a data holder with data of its own: the client slot it trains as
DATA_KEY = "fedbits-data"
DIR_KEY = "fedbits-dir"
WORKER_KEY = "fedbits-worker"
ALLOW_MODEL_KEY = "fedbits-allow-model"
ALLOW_METHOD_KEY = "fedbits-allow-method"
MAX_ROUNDS_KEY = "fedbits-max-rounds"
MAX_PAYLOAD_KEY = "fedbits-max-payload-mb"
FEDBITS_KEYS = frozenset({DATA_KEY, DIR_KEY, WORKER_KEY, ALLOW_MODEL_KEY, ALLOW_METHOD_KEY,
                          MAX_ROUNDS_KEY, MAX_PAYLOAD_KEY})

MAX_ID = 2**31 - 1
MAX_CONFIG_CHARS = 65_536
"""Longest run config a node reads (a resolved fedbits config is a few kilobytes)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
"""The files whose content a ``PATH@sha256:HEX`` model pin covers."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_MARK = "@sha256:"


class RunRefused(FedbitsError):
    """A node does not accept what a run asks of it (a model, a method, a size)."""


def is_local_path(name: str) -> bool:
    """Whether a model name is a path on this machine (as :mod:`fedbits.models` reads
    names: absolute, relative with ``./``/``../``, under ``~``, or a GGUF file)."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")


def _shown(text: str, limit: int = 120) -> str:
    """A value from the server, fit for a message: quoted (control characters escaped)
    and cut."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True)
class ModelPin:
    """A model a holder accepts: the name a run's ``model.name`` must be exactly, and for
    a local path optionally the sha256 of its weights (:func:`weights_sha256`)."""

    name: str
    sha256: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelPin:
        """``NAME`` or ``PATH@sha256:HEX``; a relative or ``~`` path is made absolute."""
        name, mark, digest = text.strip().rpartition(_HASH_MARK)
        if not mark:
            name, digest = text.strip(), ""
        if not name or any(ord(c) < 32 for c in name):
            raise FedbitsError(f"model pin {text!r} names no model")
        if is_local_path(name):
            name = str(Path(name).expanduser().absolute())
        if not mark:
            return cls(name)
        if not is_local_path(name):
            raise FedbitsError(f"model pin {text!r}: a sha256 pins the weights of a local path "
                               "(e.g. /models/llama@sha256:...), not of a hub id or built-in name")
        if not _SHA256.fullmatch(digest.lower()):
            raise FedbitsError(f"model pin {text!r}: {digest!r} is not a sha256 (64 hex digits)")
        return cls(name, digest.lower())

    def __str__(self) -> str:
        return self.name + (f"{_HASH_MARK}{self.sha256}" if self.sha256 else "")


@dataclass(frozen=True)
class Pins:
    """What a node accepts; empty fields accept anything (the demo without pins)."""

    models: tuple[ModelPin, ...] = ()
    methods: tuple[str, ...] = ()
    max_rounds: int | None = None
    max_payload_mb: float | None = None

    def model(self, name: str) -> ModelPin | None:
        return next((p for p in self.models if p.name == name), None)

    def refusals(self, cfg: Config) -> list[str]:
        """Every way ``cfg`` asks for more than these pins allow, one reason each."""
        out = []
        if self.models and self.model(cfg.model.name) is None:
            allowed = ", ".join(p.name for p in self.models)
            out.append(f"model.name {_shown(cfg.model.name)} is not a model it allows "
                       f"(--allow-model: {allowed})")
        if self.methods and cfg.method.name not in self.methods:
            out.append(f"method.name {_shown(cfg.method.name)} is not a method it allows "
                       f"(--allow-method: {', '.join(self.methods)})")
        if self.max_rounds is not None and cfg.run.rounds > self.max_rounds:
            out.append(f"run.rounds={cfg.run.rounds} is over its --max-rounds={self.max_rounds}")
        return out

    def payload_limit(self, run_limit: int) -> int:
        """The most bytes a payload may have on this node: the run's limit
        (``runtime.max_payload_mb``) or the holder's, whichever is lower. Not a reason to
        refuse a run (whose limit is a ceiling, often far above its payloads): a payload
        over it costs that round."""
        if self.max_payload_mb is None:
            return run_limit
        return min(run_limit, int(self.max_payload_mb * 1_000_000))


@dataclass(frozen=True)
class NodeSettings:
    """One SuperNode's data holder: its client slot, its data, its directory, its pins."""

    client: int
    data: str | None  # its own data (path or spec); None: the shared-source demo
    root: Path
    worker: bool = False
    pins: Pins = field(default_factory=Pins)

    @property
    def shared(self) -> bool:
        """The shared-source demo: the node trains on partition ``client`` of the run's
        ``data.source`` instead of data of its own."""
        return self.data is None

    @property
    def who(self) -> str:
        return f"partition {self.client} (shared-source demo)" if self.shared \
            else f"client {self.client}"

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> NodeSettings:
        """The settings in a node config, every key checked (an error names it)."""
        unknown = sorted(k for k in config if k.startswith("fedbits-") and k not in FEDBITS_KEYS)
        if unknown:
            raise FedbitsError(f"node config: unknown key {unknown[0]!r} (known: "
                               f"{', '.join(sorted(FEDBITS_KEYS))})")
        partition, client = config.get(PARTITION_KEY), config.get(CLIENT_KEY)
        if (partition is None) == (client is None):
            raise FedbitsError(
                f"node config must set exactly one of {CLIENT_KEY} (a data holder with "
                f"{DATA_KEY}, its own data) and {PARTITION_KEY} (the shared-source demo); "
                f"got {CLIENT_KEY}={client!r}, {PARTITION_KEY}={partition!r}")
        key = CLIENT_KEY if client is not None else PARTITION_KEY
        number = _integer(config, key, low=0, high=MAX_ID)
        data = config.get(DATA_KEY)
        if key == CLIENT_KEY and (not isinstance(data, str) or not data.strip()):
            raise FedbitsError(f"node config {DATA_KEY} must name this data holder's data (a "
                               f"file, folder or spec) with {CLIENT_KEY}; got {data!r}")
        if key == PARTITION_KEY and data is not None:
            raise FedbitsError(f"node config {DATA_KEY} goes with {CLIENT_KEY}, not with "
                               f"{PARTITION_KEY} (the shared-source demo has no data of its own)")
        pins = Pins(
            models=tuple(ModelPin.parse(line) for line in _lines(config, ALLOW_MODEL_KEY)),
            methods=_lines(config, ALLOW_METHOD_KEY),
            max_rounds=(_integer(config, MAX_ROUNDS_KEY, low=1, high=MAX_ID)
                        if MAX_ROUNDS_KEY in config else None),
            max_payload_mb=_positive(config, MAX_PAYLOAD_KEY),
        )
        if data is not None and not (pins.models and pins.methods):
            raise FedbitsError(
                f"a data holder ({CLIENT_KEY} with {DATA_KEY}) must say which models and "
                f"methods it accepts: set {ALLOW_MODEL_KEY} and {ALLOW_METHOD_KEY} "
                "(--allow-model, --allow-method)")
        root = config.get(DIR_KEY)
        if root is not None and (not isinstance(root, str) or not root):
            raise FedbitsError(f"node config {DIR_KEY} must be a directory path, got {root!r}")
        default = Path.home() / ".fedbits" / "flower-node" / f"{key.removesuffix('-id')}-{number}"
        worker = config.get(WORKER_KEY, False)
        if not isinstance(worker, bool):
            raise FedbitsError(f"node config {WORKER_KEY} must be true or false, got {worker!r}")
        return cls(number, data, Path(root).expanduser() if root else default, worker, pins)

    @classmethod
    def load(cls, root: Path) -> NodeSettings:
        """The settings ``fedbits flower supernode`` wrote into ``root`` (the worker's)."""
        path = root / NODE_CONFIG
        try:
            return cls.from_node_config(tomllib.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise FedbitsError(f"cannot read the node config {path}: {e}") from None

    def write(self) -> Path:
        """Write these settings as ``root``/:data:`NODE_CONFIG` (a TOML file of scalars,
        as Flower's ``--node-config`` takes it); return its path."""
        config: dict[str, Any] = {PARTITION_KEY if self.shared else CLIENT_KEY: self.client,
                                  DIR_KEY: str(self.root.resolve()), WORKER_KEY: self.worker}
        if self.data is not None:
            config[DATA_KEY] = self.data
        if self.pins.models:
            config[ALLOW_MODEL_KEY] = "\n".join(map(str, self.pins.models))
        if self.pins.methods:
            config[ALLOW_METHOD_KEY] = "\n".join(self.pins.methods)
        if self.pins.max_rounds is not None:
            config[MAX_ROUNDS_KEY] = self.pins.max_rounds
        if self.pins.max_payload_mb is not None:
            config[MAX_PAYLOAD_KEY] = self.pins.max_payload_mb
        path = self.root / NODE_CONFIG
        path.write_text(tomli_w.dumps(config))
        return path


def _integer(config: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FedbitsError(f"node config {key} must be an integer in {low}..{high}, got {value!r}")
    return value


def _positive(config: Mapping[str, Any], key: str) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise FedbitsError(f"node config {key} must be a positive number, got {value!r}")
    return float(value)


def _lines(config: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """A list-valued key: one entry per line of a string."""
    value = config.get(key, "")
    if not isinstance(value, str):
        raise FedbitsError(f"node config {key} must be a string, one entry per line; got "
                           f"{value!r}")
    return tuple(line.strip() for line in value.splitlines() if line.strip())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(path: Path) -> str:
    """The sha256 a ``PATH@sha256:HEX`` pin compares: a file's own (a GGUF: what
    ``sha256sum FILE`` prints), or for a model directory that of the ``sha256sum``
    listing of its weights files (:data:`WEIGHT_SUFFIXES`) in byte order of their names,
    i.e. ``(cd DIR && LC_ALL=C sha256sum *.safetensors) | sha256sum`` for safetensors
    weights. The other files (config, tokenizer) are not covered."""
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        raise FedbitsError(f"model {path} does not exist on this node")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FedbitsError(f"model {path} holds no weights files ({', '.join(WEIGHT_SUFFIXES)})")
    listing = "".join(f"{_file_sha256(f)}  {f.name}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def accept_run(text: str, settings: NodeSettings) -> Config:
    """The run config a server sent, if this node accepts it; else :class:`RunRefused`
    naming every field it refuses (or :class:`FedbitsError` for a malformed config).

    In this order, so nothing the server names is looked up before it passes: the size
    bound, the structure (no file is read), the pins, the hash of a pinned model's
    weights, and last the names the run uses (the model path is the pinned one now).
    """
    if len(text) > MAX_CONFIG_CHARS:
        raise RunRefused(f"{settings.who} refuses this run: its config is {len(text):,} "
                         f"characters, over {MAX_CONFIG_CHARS:,}")
    origin = "the run config's fedbits-config"
    cfg = parse_config(text, origin, references=False)
    refusals = settings.pins.refusals(cfg)
    if refusals:
        raise RunRefused(f"{settings.who} refuses this run: {'; '.join(refusals)}")
    pin = settings.pins.model(cfg.model.name)
    if pin is not None and pin.sha256 is not None:
        found = weights_sha256(Path(pin.name))
        if found != pin.sha256:
            raise RunRefused(f"{settings.who} refuses this run: the weights of model "
                             f"{pin.name} have sha256 {found}, not the pinned {pin.sha256} "
                             "(changed on disk since it was pinned?)")
    validate_references(cfg, origin)
    return cfg
