"""The embedded simulator: every sampled client trains in this process, one after
another, and every message is still encoded to bytes and counted.

The round itself (sampling, ledger, rejection, metrics, checkpoints) is the shared
:class:`~fedbits.runtime.loop.RoundLoop`; this runtime only carries the bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedbits.methods import get_method
from fedbits.progress import progress
from fedbits.runtime.loop import Reply, RoundLoop, Settle, client_data, describe_error
from fedbits.runtime.setup import RunSetup
from fedbits.runtime.store import ClientStores

logger = logging.getLogger(__name__)


class Simulation(RoundLoop):
    """Every client in this process, one after another; every message still bytes."""

    def __init__(self, setup: RunSetup, run_dir: Path) -> None:
        super().__init__(setup, run_dir)
        self.client = get_method(self.cfg.method.name).client(setup.method_context())
        self.stores = ClientStores(run_dir / "client_store")

    def exchange(self, round_: int, clients: list[int], settle: Settle) -> None:
        # a round of many clients on a large model takes a long time between summaries
        with progress(f"round {round_}", len(clients), "clients", logger=logger) as shown:
            for client in clients:
                down = self.encode_downlink(round_, client)
                if isinstance(down, Reply):
                    settle(client, None, down)
                else:
                    settle(client, down, self._train(round_, client, down))
                shown.update()

    def _train(self, round_: int, client: int, downlink: bytes) -> Reply:
        try:
            items, truncated = self.setup.tokenize(self.setup.clients[client])
            data = client_data(self.setup, items, round_, client)
            store = self.stores.for_client(client, round_)
            uplink = self.client.update(round_, client, downlink, data, store)
            return Reply(uplink, stats=dict(getattr(self.client, "last_stats", {})),
                         truncated=truncated)
        except Exception as e:  # a bad client never stops the round
            return Reply(error=describe_error(e))

    def commit_clients(self, round_: int) -> None:
        self.stores.commit(round_)

    def recover_clients(self, round_: int) -> None:
        self.stores.recover(round_)
