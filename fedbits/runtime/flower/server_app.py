"""The fedbits ServerApp: the simulator's round loop, with Flower carrying the bytes.

``main`` runs on the SuperLink's machine (Flower starts it for each ``flwr run``). It
reads the fedbits config from the run config, prepares the run directory exactly as
``fedbits run`` does, and drives :class:`~fedbits.runtime.loop.RoundLoop`, which
seals every downlink and opens every uplink as in the simulator; only
:meth:`FlowerLoop.exchange` differs: it sends each sampled client's sealed downlink to
the SuperNode that serves that data partition and waits for the replies. No Flower
Strategy is involved; the method's server half aggregates.

A sampled partition that no SuperNode serves, a node that reports an error, crashes,
goes offline (Flower then answers for it) or does not reply within
``runtime.round_timeout_s`` is rejected for that round like a bad client in the
simulator: the round completes with the others, the ledger has its downlink and no
uplink, and ``metrics.jsonl`` says why.
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
from fedbits.runtime.flower.processes import quiet_progress_bars
from fedbits.runtime.flower.protocol import (
    CONFIG_KEY,
    OVERWRITE_KEY,
    PREPARE,
    RESUME_KEY,
    TRAIN,
    NodeReply,
    Request,
    new_store_id,
    parse_config,
)
from fedbits.runtime.loop import RoundLoop, Settle
from fedbits.runtime.setup import RunSetup, prepare_run

logger = logging.getLogger(__name__)

FLOWER_JSON = "flower.json"  # in the run directory: the store ID, later Flower's traffic
POLL_S = 0.5  # how often the server asks the SuperLink for replies (SuperNodes poll every 3 s)
PREPARE_TTL_S = 3600.0

app = ServerApp()


def _pull(grid: Grid, ids: Iterable[str]) -> list[Message]:
    ids = [i for i in ids if i]
    return list(grid.pull_messages(ids)) if ids else []


def _reply(msg: Message, who: str) -> NodeReply:
    """A node's reply, or the transport's reason there is none."""
    if msg.has_error():
        return NodeReply(error=f"{who}: {msg.error.reason} (Flower error {msg.error.code})")
    try:
        return NodeReply.from_content(msg.content)
    except FedbitsError as e:
        return NodeReply(error=f"{who}: {e}")


class NodeDirectory:
    """Which SuperNode serves which data partition, learned by asking each new node.

    Every node that comes online gets a ``prepare`` message; its reply names the
    partition from its node config once the node has built the run's model. A node
    that goes offline is forgotten and asked again if it returns; when two online
    nodes claim one partition the later one wins (a restarted SuperNode gets a new
    ID before the old one times out).
    """

    def __init__(self, grid: Grid, store: str) -> None:
        self.grid = grid
        self.store = store
        self.nodes: dict[int, int] = {}  # partition -> node ID
        self.failed: dict[int, str] = {}  # partition -> why its node cannot serve
        self._asked: set[int] = set()
        self._pending: dict[str, int] = {}  # prepare message ID -> node ID

    def poll(self) -> None:
        online = set(self.grid.get_node_ids())
        for partition, node in list(self.nodes.items()):
            if node not in online:
                logger.info("SuperNode %d (partition %d) went offline", node, partition)
                del self.nodes[partition]
        self._asked &= online
        new = sorted(online - self._asked)
        if new:
            messages = [Message(Request(self.store).to_content(), dst_node_id=node,
                                message_type=PREPARE, ttl=PREPARE_TTL_S) for node in new]
            for node, msg_id in zip(new, list(self.grid.push_messages(messages)), strict=True):
                self._pending[msg_id] = node
            self._asked.update(new)
        for msg in _pull(self.grid, self._pending):
            node = self._pending.pop(msg.metadata.reply_to_message_id)
            reply = _reply(msg, f"SuperNode {node}")
            if reply.error:
                why = f"SuperNode {node} cannot serve it: {reply.error}"
                if reply.partition >= 0:
                    self.failed[reply.partition] = why
                logger.info("partition %d: %s", reply.partition, why)
                continue
            old = self.nodes.get(reply.partition)
            if old is not None and old != node:
                logger.info("SuperNodes %d and %d both serve partition %d; using %d",
                            old, node, reply.partition, node)
            self.nodes[reply.partition] = node
            self.failed.pop(reply.partition, None)
            logger.info("SuperNode %d serves partition %d (ready in %.1fs)", node,
                        reply.partition, reply.info.get("setup_seconds", 0))

    def wait_for(self, partitions: set[int], timeout: float) -> dict[int, int]:
        """Map ``partitions`` to nodes, waiting up to ``timeout`` s for missing ones."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            missing = partitions - set(self.nodes)
            if not missing or time.monotonic() >= deadline:
                return {p: self.nodes[p] for p in partitions if p in self.nodes}
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
                client, f"no SuperNode serves partition {client} (waited {rt.node_wait_s:g}s)"))
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
                try:
                    stats = checked_stats(reply.stats, who)
                    replies[client] = Reply(reply.blob, reply.error, stats, reply.truncated)
                except FedbitsError as e:
                    replies[client] = Reply(error=str(e))
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
        overwrite = bool(context.run_config.get(OVERWRITE_KEY, False))
        run_dir = check_run_dir(cfg, resume, overwrite)
        logger.info("fedbits run directory: %s", run_dir.resolve())
        store = store_id(run_dir, cfg, resume)
        directory = NodeDirectory(grid, store)
        directory.poll()  # nodes load the model while this process does the same
        setup = prepare_run(cfg)
        loop = FlowerLoop(setup, run_dir, grid, directory)
        setup.release_base()  # this process holds the server half only
        open_run_dir(cfg, resume, overwrite)
        if not resume:
            save_store_id(run_dir, store)
        execute(loop, resume=resume)
    except FedbitsError as e:
        logger.error("%s", e)
        raise
