"""A node's side of a run: its model, its data holder's data and its client store.

:class:`NodeHost` answers the ServerApp's requests for one SuperNode, on behalf of its
data holder (:class:`~.holder.NodeSettings`): it checks every run against what the
holder accepts (:func:`~.holder.accept_run`) before loading anything the run names,
trains on the holder's own data (loaded once, counted here: the sample count in every
uplink is the node's), or in the shared-source demo on its partition of the run's
``data.source``. It keeps the current run's :class:`NodeSession` in memory, so when it
lives in the long-lived worker (:mod:`fedbits.runtime.flower.worker`) a round costs only
the method's local work: the model is built once per run, not once per message.
Without a worker the same code runs inside each ClientApp process and rebuilds the
session every time (correct, just slower; ``info["reused"]`` says which happened). A
round on a node is the simulator's :func:`~fedbits.runtime.client.run_client`: the same
envelope checks, size limit and method code, so the same bytes come back.

The client store lives on the node's disk under ``<fedbits-dir>/runs/<store ID>/``, in
the simulator's layout. Writes of round r wait in ``pending/r`` until a later request
says round r is checkpointed on the server (:func:`settle`), so after a server crash
and ``--resume`` the node sees exactly the state the resumed round expects.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from fedbits.config import Config
from fedbits.data.examples import load_examples
from fedbits.data.types import Example
from fedbits.errors import FedbitsError
from fedbits.methods import get_method
from fedbits.runtime.client import run_client
from fedbits.runtime.flower.holder import NodeSettings, RunRefused, accept_run
from fedbits.runtime.flower.protocol import NodeReply, Request
from fedbits.runtime.loop import client_data, describe_error
from fedbits.runtime.setup import prepare_node, shared_partition
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
    """Everything one run needs on one node, built once from the run's (accepted) config."""

    def __init__(self, cfg: Config, text: str, store: str, settings: NodeSettings,
                 own: list[Example] | None) -> None:
        n = cfg.data.num_clients
        if settings.client >= n:
            raise RunRefused(f"{settings.who} refuses this run: it has data.num_clients={n} "
                             f"clients (0..{n - 1}), and this node is {settings.client}")
        start = time.perf_counter()
        self.cfg = cfg
        self.text = text  # the run config's TOML, compared to recognise the run cheaply
        self.client = settings.client
        self.store = store
        if own is None:
            logger.warning("run %s: shared-source demo: loading the run's data.source %r "
                           "and keeping partition %d of it", store, cfg.data.source, self.client)
            own = shared_partition(cfg, self.client)
        self.samples = len(own)
        self.setup = prepare_node(cfg)
        self.items, self.truncated = self.setup.tokenize(own)
        self.half = get_method(cfg.method.name).client(self.setup.method_context(last_half=True))
        self.setup.release_base()  # this process holds the client half only
        self.stores = ClientStores(settings.root / "runs" / store / "client_store")
        self.limit = settings.pins.payload_limit(self.setup.max_payload_bytes)
        self.setup_seconds = time.perf_counter() - start

    def train(self, request: Request) -> NodeReply:
        if request.client != self.client:
            raise FedbitsError(f"this node is client {self.client} but received client "
                               f"{request.client}'s downlink")
        if not 1 <= request.round <= self.cfg.run.rounds:
            raise RunRefused(f"round {request.round} is outside the run's "
                             f"run.rounds={self.cfg.run.rounds} this node accepted")
        if self.limit < self.setup.max_payload_bytes and len(request.blob) > self.limit:
            raise RunRefused(f"downlink to client {self.client}: {len(request.blob)} bytes is "
                             f"over this node's --max-payload-mb ({self.limit} bytes)")
        settle(self.stores, request.committed)
        data = client_data(self.setup, self.items, request.round, request.client)
        store = self.stores.for_client(request.client, request.round)
        start = time.perf_counter()
        reply = run_client(self.half, self.cfg.method.name, request.round, request.client,
                           request.blob, data, store, self.limit)
        return NodeReply(
            blob=reply.uplink, partition=self.client, stats=reply.stats,
            info={"train_seconds": time.perf_counter() - start}, truncated=self.truncated,
        )


class NodeHost:
    """Serves one SuperNode's requests for its data holder; keeps the latest run's
    session, and the holder's own examples, in memory."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.session: NodeSession | None = None
        self.sessions_built = 0
        self._own: list[Example] | None = None

    def _own_data(self) -> list[Example] | None:
        """The holder's own examples (``None`` in the shared-source demo), loaded once."""
        if self.settings.data is None:
            return None
        if self._own is None:
            self._own = load_examples(self.settings.data)
            logger.info("client %d: %d examples of its own in %s", self.settings.client,
                        len(self._own), self.settings.data)
        return self._own

    def _session(self, config_text: str, request: Request) -> tuple[NodeSession, bool]:
        """The run's session, and whether it was already in memory."""
        current = self.session
        if current is not None and current.text == config_text and current.store == request.store:
            return current, True
        cfg = accept_run(config_text, self.settings)
        self.session = None  # free the previous run's model before loading the next
        self.session = NodeSession(cfg, config_text, request.store, self.settings,
                                   self._own_data())
        self.sessions_built += 1
        logger.info("run %s: %s ready in %.1fs (%d examples)", request.store,
                    self.settings.who, self.session.setup_seconds, self.session.samples)
        return self.session, False

    def handle(self, op: str, config_text: str, request: Request) -> NodeReply:
        """Answer one ``prepare`` or ``train`` request; any failure becomes the reply's
        ``error`` (the server records it as this client's rejection), never a crash. A
        refusal is logged here as a warning too: the holder's operator sees what was
        asked of the node and why it said no."""
        client = self.settings.client
        try:
            session, reused = self._session(config_text, request)
            if op == "train":
                logger.info("round %d: training %s", request.round, self.settings.who)
                reply = session.train(request)
            else:
                reply = NodeReply(partition=client, info={
                    "samples": session.samples, "data": "shared" if self.settings.shared
                    else "own"})
        except RunRefused as e:
            logger.warning("%s", e)
            return NodeReply(error=str(e), partition=client, info=self._info())
        except Exception as e:
            return NodeReply(error=describe_error(e), partition=client, info=self._info())
        reply.info.update(self._info(), reused=reused,
                          setup_seconds=0.0 if reused else session.setup_seconds)
        return reply

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "sessions_built": self.sessions_built}
