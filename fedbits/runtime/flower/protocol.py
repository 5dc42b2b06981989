"""What the ServerApp and the ClientApp say to each other, in Flower's terms.

Two message types, each carrying one :class:`~flwr.app.ConfigRecord` named
``fedbits`` with the run's store ID (where nodes keep the run's state):

- ``query`` (:data:`PREPARE`): "get ready for this run". The node answers with the
  data partition its node config assigns it, after building its model and data, so
  the server learns which SuperNode serves which partition and round 1 finds every
  node warm.
- ``train`` (:data:`TRAIN`): one round for one client. The fedbits downlink travels
  untouched as the bytes value ``blob`` (a ConfigRecord carries bytes as they are:
  a few hundred bytes of framing, never chunked); the reply carries the uplink the
  same way, or the reason there is none.

Everything a node needs besides the messages is in the run config Flower gives
every node (:data:`CONFIG_KEY`: the resolved fedbits config as TOML) and in the node
config the SuperNode was started with (:data:`PARTITION_KEY`, :data:`DIR_KEY`,
:data:`WORKER_KEY`). This module imports no torch: the ClientApp process that uses
it only relays bytes.
"""

from __future__ import annotations

import json
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, MessageType, RecordDict

from fedbits.config import Config
from fedbits.errors import ConfigError, FedbitsError
from fedbits.resolve import load_config

RECORD = "fedbits"
MAX_COUNT = 2**31 - 1
"""Bound on a count a node reports (a hostile node must not overflow the metrics)."""
PREPARE = MessageType.QUERY
TRAIN = MessageType.TRAIN

# run config (the generated app's [tool.flwr.app.config])
CONFIG_KEY = "fedbits-config"
RESUME_KEY = "fedbits-resume"
OVERWRITE_KEY = "fedbits-overwrite"

# node config (flower-supernode --node-config)
PARTITION_KEY = "partition-id"
DIR_KEY = "fedbits-dir"
WORKER_KEY = "fedbits-worker"


def new_store_id(cfg: Config) -> str:
    """Names a run's state on every node: the run name plus a random suffix.

    Made once when a run starts and kept in the run directory, so a resumed run finds
    the client stores it left on the nodes, while a run started again from scratch
    (``--overwrite``) never sees the stores of the run it replaces.
    """
    name = re.sub(r"[^A-Za-z0-9_-]", "_", cfg.run.name)[:64]
    return f"{name}-{secrets.token_hex(6)}"


def parse_config(text: str, origin: str) -> Config:
    """The fedbits config a run carries as text, validated exactly as ``fedbits run``
    validates a file; errors name ``origin`` instead of a temporary path."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fedbits.toml"
        path.write_text(text)
        try:
            return load_config(path)
        except ConfigError as e:
            raise ConfigError(str(e).replace(str(path), origin)) from None


def node_partition(node_config: dict[str, Any]) -> int:
    """The data partition a SuperNode serves, from its node config."""
    value = node_config.get(PARTITION_KEY)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FedbitsError(
            f"node config {PARTITION_KEY} must be a non-negative integer, got {value!r}: "
            f"start the SuperNode with --node-config '{PARTITION_KEY}=N'"
        )
    return value


def node_dir(node_config: dict[str, Any]) -> Path:
    """Where a SuperNode keeps fedbits state (client stores, the worker's socket)."""
    value = node_config.get(DIR_KEY)
    if value is None:
        return Path.home() / ".fedbits" / "flower-node" / f"partition-{node_partition(node_config)}"
    if not isinstance(value, str) or not value:
        raise FedbitsError(f"node config {DIR_KEY} must be a directory path, got {value!r}")
    return Path(value).expanduser()


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
        rec = _record(content, "node reply")
        try:
            blob = rec.get("blob")
            reply = cls(
                blob=None if blob is None else _bytes(blob), error=str(rec["error"]),
                partition=_int(rec["partition"]), stats=json.loads(str(rec["stats"])),
                info=json.loads(str(rec["info"])), truncated=_int(rec.get("truncated", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FedbitsError(f"malformed node reply: {type(e).__name__}: {e}") from None
        if not isinstance(reply.stats, dict) or not isinstance(reply.info, dict):
            raise FedbitsError("malformed node reply: 'stats' and 'info' must be JSON objects")
        if not 0 <= reply.truncated <= MAX_COUNT:
            raise FedbitsError(f"malformed node reply: truncated={reply.truncated} is not a "
                               f"count in 0..{MAX_COUNT}")
        return reply


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
