"""What the ServerApp and the ClientApp say to each other, in Flower's terms.

Two message types, each carrying one :class:`~flwr.app.ConfigRecord` named
``fedbits`` with the run's store ID (where nodes keep the run's state):

- ``query`` (:data:`PREPARE`): "get ready for this run". The node answers with the
  client (``partition``) its data holder is, after checking the run against what the
  holder accepts and building its model and data, or with why it refuses; so the
  server learns which SuperNode serves which client (and binds the two, :mod:`.identity`)
  and round 1 finds every node warm.
- ``train`` (:data:`TRAIN`): one round for one client. The fedbits downlink travels
  untouched as the bytes value ``blob`` (a ConfigRecord carries bytes as they are:
  a few hundred bytes of framing, never chunked); the reply carries the uplink the
  same way, or the reason there is none.

Everything a node needs besides the messages is in the run config Flower gives
every node (:data:`CONFIG_KEY`: the resolved fedbits config as TOML, which the node
checks against what it accepts) and in the node config the SuperNode was started with
(its data holder's own settings, :mod:`.holder`). This module imports no torch: the
ClientApp process that uses it only relays bytes.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, MessageType, RecordDict

from fedbits.config import Config, read_config
from fedbits.errors import ConfigError, FedbitsError
from fedbits.resolve import load_config

RECORD = "fedbits"
MAX_COUNT = 2**31 - 1
"""Bound on a count a node reports (a hostile node must not overflow the metrics)."""

# Bounds on everything else a node's reply carries besides the uplink (whose size
# ``runtime.max_payload_mb`` bounds): a reply is untrusted input that ends up in the
# server's memory, its log and ``metrics.jsonl``, and one outside them costs the node
# its round, never the run.
MAX_ERROR_CHARS = 2000
"""A node's error text is cut to this many characters (the reason is still recorded)."""
MAX_JSON_CHARS = 16_384
"""Longest ``stats`` or ``info`` JSON text accepted from a node."""
MAX_ENTRIES = 64
"""Most entries in a node's ``stats`` or ``info`` object."""
MAX_KEY_CHARS = 64
"""Longest key in a node's ``stats`` or ``info`` object."""
MAX_TEXT_CHARS = 256
"""Longest string value in a node's ``info``."""
MAX_INT = 2**63 - 1
"""Largest magnitude of an integer in a node's ``info`` (a 64-bit signed integer)."""
REPLY_FIELDS = frozenset({"blob", "error", "partition", "stats", "info", "truncated"})
PREPARE = MessageType.QUERY
TRAIN = MessageType.TRAIN

# run config (the generated app's [tool.flwr.app.config])
CONFIG_KEY = "fedbits-config"
RESUME_KEY = "fedbits-resume"


def new_store_id(cfg: Config) -> str:
    """Names a run's state on every node: the run name plus a random suffix.

    Made once when a run starts and kept in the run directory, so a resumed run finds
    the client stores it left on the nodes, while a run started again from scratch
    (after its old directory was removed on the SuperLink host) never sees the stores
    of the run it replaces.
    """
    name = re.sub(r"[^A-Za-z0-9_-]", "_", cfg.run.name)[:64]
    return f"{name}-{secrets.token_hex(6)}"


def parse_config(text: str, origin: str, *, references: bool = True) -> Config:
    """The fedbits config a run carries as text, validated exactly as ``fedbits run``
    validates a file; errors name ``origin`` instead of a temporary path. Without
    ``references`` only its structure is checked: the model and method names are not
    looked up (a node looks up only what it accepts, :func:`.holder.accept_run`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fedbits.toml"
        path.write_text(text)
        try:
            return load_config(path) if references else read_config(path)
        except ConfigError as e:
            raise ConfigError(str(e).replace(str(path), origin)) from None


_STORE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")  # a directory name; never "..", never a path


@dataclass
class Request:
    """What the server asks of a node: ``prepare`` for a run, or one client's round."""

    store: str  # the run's store ID: where the node keeps this run's state
    round: int = 0
    client: int = -1
    committed: int = 0  # client-store writes of rounds up to this one are final
    blob: bytes = b""  # the fedbits downlink, untouched

    def to_content(self) -> RecordDict:
        return RecordDict({RECORD: ConfigRecord({
            "store": self.store, "round": self.round, "client": self.client,
            "committed": self.committed, "blob": self.blob,
        })})

    @classmethod
    def from_content(cls, content: RecordDict) -> Request:
        rec = _record(content, "request")
        try:
            request = cls(str(rec["store"]), _int(rec["round"]), _int(rec["client"]),
                          _int(rec["committed"]), _bytes(rec["blob"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FedbitsError(f"malformed request: {type(e).__name__}: {e}") from None
        if not _STORE.match(request.store):  # it becomes a directory name on the node
            raise FedbitsError(f"malformed request: store ID {request.store!r}")
        return request


@dataclass
class NodeReply:
    """A node's answer: an uplink (train), or an error; ``info`` says how it went.

    ``info`` holds what the runtime measured on the node (the worker's pid, whether
    the run's model was already in memory, seconds spent setting up and training);
    ``stats`` is what the method's client half measured, as in the simulator.
    """

    blob: bytes | None = None
    error: str = ""
    partition: int = -1
    stats: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    truncated: int = 0  # training examples of the partition that max_length cuts

    def to_content(self) -> RecordDict:
        rec: dict[str, Any] = {
            "error": self.error, "partition": self.partition,
            "stats": json.dumps(self.stats), "info": json.dumps(self.info),
            "truncated": self.truncated,
        }
        if self.blob is not None:
            rec["blob"] = self.blob
        return RecordDict({RECORD: ConfigRecord(rec)})

    @classmethod
    def from_content(cls, content: RecordDict) -> NodeReply:
        """A node's reply, checked field by field against the bounds above; anything
        else raises a :class:`FedbitsError` saying which field is wrong (the caller
        prefixes the node), never another exception."""
        rec = _record(content, "node reply")
        try:
            unknown = sorted(set(rec) - REPLY_FIELDS)
            if unknown:
                raise ValueError(f"unexpected fields {', '.join(map(repr, unknown[:5]))}")
            blob, error = rec.get("blob"), rec["error"]
            if blob is not None and not isinstance(blob, bytes):
                raise TypeError(f"'blob' is a {type(blob).__name__}, not bytes")
            if not isinstance(error, str):
                raise TypeError(f"'error' is a {type(error).__name__}, not a string")
            return cls(
                blob=blob, error=bounded_text(error),
                partition=_count(rec["partition"], "partition", low=-1),
                stats=_json_object(rec["stats"], "stats"),
                info=_info(_json_object(rec["info"], "info")),
                truncated=_count(rec.get("truncated", 0), "truncated"),
            )
        except KeyError as e:
            raise FedbitsError(f"malformed node reply: no {e} field") from None
        except (TypeError, ValueError) as e:
            raise FedbitsError(f"malformed node reply: {e}") from None


def bounded_text(text: str) -> str:
    """Text a node sent, fit for one log line and a ``rejected`` entry: control
    characters (newlines, terminal escapes) become spaces and anything past
    :data:`MAX_ERROR_CHARS` is cut, saying how much was."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", text)
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[:MAX_ERROR_CHARS]}... ({len(text) - MAX_ERROR_CHARS} more characters)"
    return text


def _count(value: object, name: str, low: int = 0) -> int:
    """A reply's integer field in ``low..MAX_COUNT``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name!r} is a {type(value).__name__}, not an integer")
    if not low <= value <= MAX_COUNT:
        raise ValueError(f"{name}={value} is not a count in {low}..{MAX_COUNT}")
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a finite number")


def _json_object(value: object, name: str) -> dict[str, Any]:
    """A reply's JSON-object field (``stats``, ``info``): a string of at most
    :data:`MAX_JSON_CHARS` holding an object of at most :data:`MAX_ENTRIES` entries
    whose keys are at most :data:`MAX_KEY_CHARS` long. NaN and infinities are refused
    (``metrics.jsonl`` must stay strict JSON); so is nesting too deep for the parser."""
    if not isinstance(value, str):
        raise TypeError(f"{name!r} is a {type(value).__name__}, not JSON text")
    if len(value) > MAX_JSON_CHARS:
        raise ValueError(f"{name!r} is {len(value)} characters of JSON, over {MAX_JSON_CHARS}")
    try:
        obj = json.loads(value, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{name!r} is nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{name!r} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"'stats' and 'info' must be JSON objects, {name!r} is a "
                         f"{type(obj).__name__}")
    if len(obj) > MAX_ENTRIES:
        raise ValueError(f"{name!r} has {len(obj)} entries, over {MAX_ENTRIES}")
    for key in obj:
        if len(key) > MAX_KEY_CHARS:
            raise ValueError(f"{name!r} has a key of {len(key)} characters, over {MAX_KEY_CHARS}")
    return obj


def _info(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` if every value is a JSON scalar: a string of at most
    :data:`MAX_TEXT_CHARS`, a boolean, null, an integer of at most :data:`MAX_INT` in
    magnitude or a finite float. It is copied into ``metrics.jsonl`` as it is."""
    for key, value in info.items():
        if isinstance(value, str):
            if len(value) > MAX_TEXT_CHARS:
                raise ValueError(f"'info' entry {key!r} is {len(value)} characters long, "
                                 f"over {MAX_TEXT_CHARS}")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if abs(value) > MAX_INT:
                raise ValueError(f"'info' entry {key!r} is an integer beyond ±{MAX_INT}")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"'info' entry {key!r} is {value}, not a finite number")
        else:
            raise ValueError(f"'info' entry {key!r} is a JSON {type(value).__name__}, not a "
                             "string, number, boolean or null")
    return info


def _int(value: object) -> int:
    """A record's integer field; a record value of any other type is malformed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _bytes(value: object) -> bytes:
    """A record's bytes field (a payload travels untouched, never as text)."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def _record(content: RecordDict, what: str) -> ConfigRecord:
    if RECORD not in content.config_records:
        raise FedbitsError(f"{what} has no {RECORD!r} config record: not a fedbits app message")
    return content.config_records[RECORD]
