"""The fedbits ServerApp: the simulator's round loop, with Flower carrying the bytes.

``main`` runs on the SuperLink's machine (Flower starts it for each ``flwr run``). It
reads the fedbits config from the run config, prepares the run directory exactly as
``fedbits run`` does, and drives :class:`~fedbits.runtime.loop.RoundLoop`, which
seals every downlink and opens every uplink as in the simulator; only
:meth:`FlowerLoop.exchange` differs: it sends each sampled client's sealed downlink to
the SuperNode that serves that client and waits for the replies. No Flower Strategy
is involved; the method's server half aggregates.

The server never loads the clients' data (:func:`~fedbits.runtime.setup.prepare_server`):
each node trains on its data holder's own, counts its samples itself and may refuse a
run; the server evaluates on ``data.eval_source``, a set of its own, if the run names
one. Which node serves which client is learned from the nodes and bound to their keys
on first contact (:class:`NodeDirectory`): a second node claiming a bound client is
refused, not obeyed.

A sampled client that no SuperNode serves, a node that refuses, reports an error, crashes,
goes offline (Flower then answers for it), sends a malformed reply (see
:meth:`~.protocol.NodeReply.from_content` for the bounds) or does not reply within
``runtime.round_timeout_s`` is rejected for that round like a bad client in the
simulator: the round completes with the others, the ledger has its downlink and no
uplink, and ``metrics.jsonl`` says why.

Where the run is written is the SuperLink host's decision, not the submitted run's:
the run directory is ``run.name`` under the host's runs directory
(:func:`~.processes.runs_root`), whatever ``run.out_dir`` the config carries, and an
existing run directory is only ever resumed, never deleted (:func:`host_run_dir`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedbits.config import Config
from fedbits.errors import FedbitsError
from fedbits.logs import configure
from fedbits.runtime import check_run_dir, execute, open_run_dir
from fedbits.runtime.client import Reply, checked_stats
from fedbits.runtime.flower.identity import Holders, holders_path, key_fingerprint
from fedbits.runtime.flower.processes import quiet_progress_bars, runs_root
from fedbits.runtime.flower.protocol import (
    CONFIG_KEY,
    PREPARE,
    RESUME_KEY,
    TRAIN,
    NodeReply,
    Request,
    bounded_text,
    new_store_id,
    parse_config,
)
from fedbits.runtime.loop import RoundLoop, Settle
from fedbits.runtime.setup import RunSetup, prepare_server

logger = logging.getLogger(__name__)

FLOWER_JSON = "flower.json"  # in the run directory: the store ID, later Flower's traffic
POLL_S = 0.5  # how often the server asks the SuperLink for replies (SuperNodes poll every 3 s)
PREPARE_TTL_S = 3600.0

app = ServerApp()


def _pull(grid: Grid, ids: Iterable[str]) -> list[Message]:
    ids = [i for i in ids if i]
    return list(grid.pull_messages(ids)) if ids else []


def _reply(msg: Message, who: str) -> NodeReply:
    """A node's reply, or the reason there is none: the transport's, or what is wrong
    with a malformed reply (which never raises: it costs the node its round)."""
    if msg.has_error():
        reason = bounded_text(str(msg.error.reason))  # the node's ClientApp may set it
        return NodeReply(error=f"{who}: {reason} (Flower error {msg.error.code})")
    try:
        return NodeReply.from_content(msg.content)
    except FedbitsError as e:
        return NodeReply(error=f"{who}: {e}")


def train_reply(reply: NodeReply, who: str, client: int) -> Reply:
    """What the round loop settles for client ``client`` from a node's (parsed) reply.

    A reply with an error is a rejection with the node's text (the simulator's text for
    the same failure, so the two runtimes record the same reasons). Otherwise it must be
    for the partition that was asked and carry an uplink, and its stats must be finite
    numbers; if not, the client is rejected with a reason naming ``who``.
    """
    if reply.error:
        return Reply(error=reply.error, truncated=reply.truncated)
    if reply.partition != client:
        return Reply(error=f"{who}: its reply is for partition {reply.partition}, not {client}")
    if reply.blob is None:
        return Reply(error=f"{who}: its reply holds neither an uplink nor an error")
    try:
        stats = checked_stats(reply.stats, who)
    except FedbitsError as e:
        return Reply(error=str(e))
    return Reply(reply.blob, stats=stats, truncated=reply.truncated)


def _ready_in(info: dict[str, Any]) -> str:
    """`` (ready in 1.2s)`` from a prepare reply's ``setup_seconds``, if it is a number."""
    seconds = info.get("setup_seconds")
    return f" (ready in {seconds:.1f}s)" if isinstance(seconds, int | float) else ""


def _serving(client: int, info: dict[str, Any]) -> str:
    """What a node says it trains on, from its prepare reply (for the log only)."""
    samples = info.get("samples")
    count = f"{samples} examples" if isinstance(samples, int) else "examples"
    if info.get("data") == "shared":
        return (f"partition {client} of the run's data.source ({count}; shared-source demo: "
                "the node loads the whole source)")
    return f"client {client} with {count} of its own"


class NodeDirectory:
    """Which SuperNode serves which client, learned by asking each new node and bound to
    the node's key.

    Every node that comes online gets a ``prepare`` message; its reply names the client
    (its data holder) once the node has accepted the run and built its model, or says
    why it refuses. The first node to claim a client binds that client to its public
    key (:class:`~.identity.Holders`); a node with another key that claims a bound client
    is refused: logged, never sent a round, and nothing it sends is used. A node that
    goes offline is forgotten and asked again if it returns; with its key it gets its
    client back.
    """

    def __init__(self, grid: Grid, store: str, holders: Holders, clients: int) -> None:
        self.grid = grid
        self.store = store
        self.holders = holders
        self.clients = clients  # data.num_clients: the client slots of the run
        self.nodes: dict[int, int] = {}  # client -> node ID
        self.failed: dict[int, str] = {}  # client -> why its node cannot serve
        self._keys: dict[int, str] = {}  # node ID -> fingerprint of its public key
        self._asked: set[int] = set()
        self._pending: dict[str, int] = {}  # prepare message ID -> node ID

    def greet(self) -> None:
        """Forget the nodes that went offline; send ``prepare`` to those that came online.
        Their replies wait on the SuperLink for :meth:`poll`."""
        online = {int(info.node_id): info for info in self.grid.get_nodes()}
        for client, node in list(self.nodes.items()):
            if node not in online:
                logger.info("SuperNode %d (client %d) went offline", node, client)
                del self.nodes[client]
        self._asked &= online.keys()
        new = sorted(online.keys() - self._asked)
        for node in new:
            key = bytes(online[node].public_key)
            self._keys[node] = key_fingerprint(key) if key else f"node-id:{node}"
        if new:
            messages = [Message(Request(self.store).to_content(), dst_node_id=node,
                                message_type=PREPARE, ttl=PREPARE_TTL_S) for node in new]
            for node, msg_id in zip(new, list(self.grid.push_messages(messages)), strict=True):
                self._pending[msg_id] = node
            self._asked.update(new)

    def poll(self) -> None:
        """:meth:`greet`, then take in the prepare replies that arrived."""
        self.greet()
        for msg in _pull(self.grid, self._pending):
            node = self._pending.pop(msg.metadata.reply_to_message_id)
            reply = _reply(msg, f"SuperNode {node}")
            client = reply.partition
            if not 0 <= client < self.clients:
                logger.warning("SuperNode %d cannot serve this run: %s", node,
                               reply.error or f"it names client {client}, not one of the "
                               f"run's 0..{self.clients - 1}")
                continue
            if not self._claim(node, client):
                continue
            if reply.error:
                self.failed[client] = f"SuperNode {node} cannot serve it: {reply.error}"
                logger.warning("client %d: %s", client, self.failed[client])
                continue
            self.nodes[client] = node
            self.failed.pop(client, None)
            logger.info("SuperNode %d serves %s%s", node, _serving(client, reply.info),
                        _ready_in(reply.info))

    def _claim(self, node: int, client: int) -> bool:
        """Whether ``node``'s claim on ``client`` holds (binding it on first contact);
        a refused claim is logged and the node is never used."""
        key = self._keys[node]
        bound = self.holders.claim(client, key, node)
        if bound is None:
            return True
        holder = f"SuperNode {bound.node}" if bound.node else "bound by the host's operator"
        logger.warning("SuperNode %d (key %s) claims client %d, which is bound to another "
                       "key (%s, %s, since %s): refused; nothing it sends is used",
                       node, key, client, bound.key, holder, bound.since)
        return False

    def wait_for(self, clients: set[int], timeout: float) -> dict[int, int]:
        """Map ``clients`` to nodes, waiting up to ``timeout`` s for those no node has
        answered for yet (a client whose node refused or failed is not waited for)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            missing = clients - self.nodes.keys() - self.failed.keys()
            if not missing or time.monotonic() >= deadline:
                return {c: self.nodes[c] for c in clients if c in self.nodes}
            time.sleep(POLL_S)


class FlowerLoop(RoundLoop):
    """The shared round loop with Flower messages as the transport."""

    def __init__(self, setup: RunSetup, run_dir: Path, grid: Grid,
                 directory: NodeDirectory) -> None:
        super().__init__(setup, run_dir)
        self.grid = grid
        self.directory = directory
        self.committed = 0  # the last round whose checkpoint is written
        self._round_info: dict[str, dict[str, Any]] = {}

    def commit_clients(self, round_: int) -> None:
        self.committed = round_  # nodes commit when their next request says so

    def recover_clients(self, round_: int) -> None:
        self.committed = round_

    def exchange(self, round_: int, downlinks: dict[int, bytes], settle: Settle) -> None:
        """Send every downlink at once, wait for the replies, settle in client order."""
        replies = self._deliver(round_, downlinks)
        for client, downlink in downlinks.items():
            settle(client, downlink, replies[client])

    def _deliver(self, round_: int, downlinks: dict[int, bytes]) -> dict[int, Reply]:
        """One Flower message per client to the node serving its partition; the replies."""
        rt = self.cfg.runtime
        targets = self.directory.wait_for(set(downlinks), rt.node_wait_s)
        replies: dict[int, Reply] = {}
        for client in downlinks.keys() - targets.keys():
            replies[client] = Reply(error=self.directory.failed.get(
                client, f"no SuperNode serves client {client} (waited {rt.node_wait_s:g}s)"))
        order = sorted(targets)
        store = self.directory.store
        messages = [
            Message(Request(store, round_, c, self.committed, downlinks[c]).to_content(),
                    dst_node_id=targets[c], message_type=TRAIN, group_id=str(round_),
                    ttl=rt.round_timeout_s)
            for c in order
        ]
        self._round_info = {}
        sent = time.monotonic()
        waiting: dict[str, int] = {}
        pushed = list(self.grid.push_messages(messages)) if messages else []
        for client, msg_id in zip(order, pushed, strict=True):
            if msg_id:
                waiting[msg_id] = client
            else:  # Flower returns None for a message the SuperLink would not take
                replies[client] = Reply(error=f"the SuperLink refused the message to SuperNode "
                                        f"{targets[client]}")
        while waiting and time.monotonic() - sent < rt.round_timeout_s:
            for msg in _pull(self.grid, waiting):
                client = waiting.pop(msg.metadata.reply_to_message_id)
                who = f"SuperNode {targets[client]} (partition {client})"
                reply = _reply(msg, who)
                replies[client] = train_reply(reply, who, client)
                # the server's own measurements last: a node cannot overwrite them
                self._round_info[str(client)] = {
                    **reply.info, "node_id": targets[client], "seconds": time.monotonic() - sent,
                }
            if waiting:
                time.sleep(POLL_S)
        for client in waiting.values():
            replies[client] = Reply(
                error=f"no reply from SuperNode {targets[client]} (partition {client}) within "
                f"runtime.round_timeout_s={rt.round_timeout_s:g}s")
        return replies

    def run_round(self, round_: int) -> dict[str, Any]:
        row = super().run_round(round_)
        row["flower"] = self._round_info  # per client: node, round trip, worker pid, set-up
        return row


def store_id(run_dir: Path, cfg: Config, resume: bool) -> str:
    """The run's store ID on the nodes: new for a fresh run (saved by :func:`save_store_id`
    once the run directory is opened), the saved one to resume."""
    path = run_dir / FLOWER_JSON
    if resume:
        try:
            return str(json.loads(path.read_text())["store_id"])
        except (OSError, ValueError, KeyError):
            raise FedbitsError(
                f"cannot resume {run_dir} on Flower: {path} does not name the nodes' store "
                "(was the run started with runtime.kind='flower'?)") from None
    return new_store_id(cfg)


def save_store_id(run_dir: Path, store: str) -> None:
    (run_dir / FLOWER_JSON).write_text(json.dumps({"store_id": store}, indent=2) + "\n")


def host_run_dir(cfg: Config, resume: bool, root: Path) -> Path:
    """The run directory on this (the SuperLink's) host: ``run.name`` under ``root``.

    ``cfg.run.out_dir`` is set to ``root`` (the config saved in the run directory says
    where the run really is): a submitted config chooses only the run's name, which the
    config already holds to one directory name. A fresh run whose directory exists is
    refused, so nothing a run submits ever deletes a directory on this host; clearing
    one is the host operator's act. Writes nothing.
    """
    if cfg.run.out_dir != str(root):
        logger.info("run.out_dir=%s is the submitter's; this SuperLink writes runs under %s",
                    cfg.run.out_dir, root)
    cfg.run.out_dir = str(root)
    run_dir = cfg.run_dir
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise FedbitsError(
            f"run directory {run_dir} already exists on the SuperLink host, and a submitted "
            "run never deletes one: continue it with `fedbits run CONFIG --resume`, choose "
            f"another run.name, or ask the SuperLink host's operator to remove it there "
            f"(`rm -r {run_dir}`)")
    return check_run_dir(cfg, resume, overwrite=False)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the fedbits experiment the run config carries, to the end."""
    configure()  # this process's standard output is the run's Flower log
    quiet_progress_bars()
    try:
        text = context.run_config.get(CONFIG_KEY)
        if not isinstance(text, str):
            raise FedbitsError(f"the run config has no {CONFIG_KEY!r}: generate the app with "
                               "`fedbits flower app` or launch with `fedbits run`")
        cfg = parse_config(text, f"run config {CONFIG_KEY}")
        resume = bool(context.run_config.get(RESUME_KEY, False))
        run_dir = host_run_dir(cfg, resume, runs_root())
        logger.info("fedbits run directory: %s", run_dir)
        store = store_id(run_dir, cfg, resume)
        directory = NodeDirectory(grid, store, Holders(holders_path(run_dir)),
                                  cfg.data.num_clients)
        directory.greet()  # nodes load the model while this process does the same
        setup = prepare_server(cfg)  # never the clients' data: that stays on the nodes
        loop = FlowerLoop(setup, run_dir, grid, directory)
        setup.release_base()  # this process holds the server half only
        open_run_dir(cfg, resume, overwrite=False)  # before any binding is written there
        if not resume:
            save_store_id(run_dir, store)
        execute(loop, resume=resume)
    except FedbitsError as e:
        logger.error("%s", e)
        raise
