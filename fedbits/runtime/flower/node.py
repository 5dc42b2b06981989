"""A node's side of a run: its model, its partition's data and its client store.

:class:`NodeHost` answers the ServerApp's requests for one SuperNode. It keeps the
current run's :class:`NodeSession` in memory, so when it lives in the long-lived
worker (:mod:`fedbits.runtime.flower.worker`) a round costs only the method's local
work: the model is built once per run, not once per message. Without a worker the
same code runs inside each ClientApp process and rebuilds the session every time
(correct, just slower; ``info["reused"]`` says which happened). A round on a node is
the simulator's :func:`~fedbits.runtime.client.run_client`: the same envelope checks,
size limit and method code, so the same bytes come back.

The client store lives on the node's disk under ``<fedbits-dir>/runs/<store ID>/``, in
the simulator's layout. Writes of round r wait in ``pending/r`` until a later request
says round r is checkpointed on the server (:func:`settle`), so after a server crash
and ``--resume`` the node sees exactly the state the resumed round expects.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from fedbits.config import Config
from fedbits.errors import FedbitsError
from fedbits.methods import get_method
from fedbits.runtime.client import run_client
from fedbits.runtime.flower.protocol import NodeReply, Request, parse_config
from fedbits.runtime.loop import client_data, describe_error
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.store import ClientStores

logger = logging.getLogger(__name__)


def settle(stores: ClientStores, committed: int) -> None:
    """Commit the pending writes of every round up to ``committed``, drop later ones.

    A node may sit out rounds, so more than one round can be waiting; a round after
    ``committed`` was cut short (the server resumed from an earlier checkpoint) and
    its writes must not count.
    """
    pending = stores.root / "pending"
    rounds = sorted(int(p.name) for p in pending.iterdir()) if pending.is_dir() else []
    for round_ in rounds:
        if round_ < committed:
            stores.commit(round_)
    stores.recover(committed)


class NodeSession:
    """Everything one run needs on one node, built once from the run's config."""

    def __init__(self, cfg: Config, text: str, store: str, partition: int, root: Path) -> None:
        if partition >= cfg.data.num_clients:
            n = cfg.data.num_clients
            raise FedbitsError(f"node config partition-id={partition} is outside the run's "
                               f"data.num_clients={n} partitions (0..{n - 1})")
        start = time.perf_counter()
        self.cfg = cfg
        self.text = text  # the run config's TOML, compared to recognise the run cheaply
        self.partition = partition
        self.store = store
        self.setup = prepare_run(cfg)
        self.items, self.truncated = self.setup.tokenize(self.setup.clients[partition])
        self.client = get_method(cfg.method.name).client(self.setup.method_context(last_half=True))
        self.setup.release_base()  # this process holds the client half only
        self.stores = ClientStores(root / "runs" / store / "client_store")
        self.setup_seconds = time.perf_counter() - start

    def train(self, request: Request) -> NodeReply:
        if request.client != self.partition:
            raise FedbitsError(
                f"this node serves partition {self.partition} but received client "
                f"{request.client}'s downlink"
            )
        settle(self.stores, request.committed)
        data = client_data(self.setup, self.items, request.round, request.client)
        store = self.stores.for_client(request.client, request.round)
        start = time.perf_counter()
        reply = run_client(self.client, self.cfg.method.name, request.round, request.client,
                           request.blob, data, store, self.setup.max_payload_bytes)
        return NodeReply(
            blob=reply.uplink, partition=self.partition, stats=reply.stats,
            info={"train_seconds": time.perf_counter() - start}, truncated=self.truncated,
        )


class NodeHost:
    """Serves one SuperNode's requests; keeps the latest run's session in memory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.session: NodeSession | None = None
        self.sessions_built = 0

    def _session(self, config_text: str, request: Request,
                 partition: int) -> tuple[NodeSession, bool]:
        """The run's session, and whether it was already in memory."""
        current = self.session
        if (current is not None and current.text == config_text
                and current.store == request.store and current.partition == partition):
            return current, True
        cfg = parse_config(config_text, "the run config's fedbits-config")
        self.session = None  # free the previous run's model before loading the next
        self.session = NodeSession(cfg, config_text, request.store, partition, self.root)
        self.sessions_built += 1
        logger.info("run %s: partition %d ready in %.1fs", request.store, partition,
                    self.session.setup_seconds)
        return self.session, False

    def handle(self, op: str, config_text: str, partition: int, request: Request) -> NodeReply:
        """Answer one ``prepare`` or ``train`` request; any failure becomes the reply's
        ``error`` (the server records it as this client's rejection), never a crash."""
        try:
            session, reused = self._session(config_text, request, partition)
            if op == "train":
                logger.info("round %d: training partition %d", request.round, partition)
                reply = session.train(request)
            else:
                reply = NodeReply(partition=partition)
        except Exception as e:
            return NodeReply(error=describe_error(e), partition=partition, info=self._info())
        reply.info.update(self._info(), reused=reused,
                          setup_seconds=0.0 if reused else session.setup_seconds)
        return reply

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "sessions_built": self.sessions_built}
