"""The embedded simulator: every sampled client trains in this process, one after
another, and every message is still sealed to bytes, opened and counted.

The round itself (sampling, sealing every downlink before any uplink is decoded,
ledger, rejection, metrics, checkpoints) is the shared
:class:`~fedbits.runtime.loop.RoundLoop`, and each client's side is the shared
:func:`~fedbits.runtime.client.run_client` a Flower node runs too; this runtime only
carries the bytes.

Nothing here grows with the number of clients: a client's store keeps at most
``runtime.client_state_mb`` in memory and the rest on disk (:mod:`.store`), and a
client's data is tokenised the first time it is sampled and kept compactly
(:mod:`.tokens`), so memory follows the data trained on, not the clients or rounds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedbits.methods import get_method
from fedbits.progress import progress
from fedbits.runtime.client import Reply, run_client
from fedbits.runtime.loop import RoundLoop, Settle, client_data, describe_error
from fedbits.runtime.setup import RunSetup
from fedbits.runtime.store import ClientStores
from fedbits.runtime.tokens import TokenCache

__all__ = ["Reply", "Settle", "Simulation"]

logger = logging.getLogger(__name__)


class Simulation(RoundLoop):
    """Every client in this process, one after another; every message still bytes."""

    server_half_only = False  # the client half is built after it

    def __init__(self, setup: RunSetup, run_dir: Path) -> None:
        super().__init__(setup, run_dir)
        self.client = get_method(self.cfg.method.name).client(setup.method_context(last_half=True))
        setup.release_base()  # both halves are built
        self.stores = ClientStores(run_dir / "client_store",
                                   int(self.cfg.runtime.client_state_mb * 1_000_000))
        self.tokens = TokenCache(setup.tokenize, setup.clients)

    def exchange(self, round_: int, downlinks: dict[int, bytes], settle: Settle) -> None:
        """Train each client on its downlink and settle it before training the next, so
        a round holds one uplink at a time."""
        # a round of many clients on a large model takes a long time between summaries
        with progress(f"round {round_}", len(downlinks), "clients", logger=logger) as shown:
            for client, downlink in downlinks.items():
                settle(client, downlink, self._train(round_, client, downlink))
                shown.update()

    def _train(self, round_: int, client: int, downlink: bytes) -> Reply:
        try:
            items, truncated = self.tokens.get(client)
            data = client_data(self.setup, items, round_, client)
            store = self.stores.for_client(client, round_)
            reply = run_client(self.client, self.cfg.method.name, round_, client, downlink,
                               data, store, self.setup.max_payload_bytes)
        except Exception as e:  # a bad client never stops the round
            return Reply(error=describe_error(e))
        reply.truncated = truncated
        return reply

    def commit_clients(self, round_: int) -> None:
        self.stores.commit(round_)
        logger.debug("client store after round %d: %d B in memory (%d values), %s", round_,
                     self.stores.memory_bytes(), self.stores.memory_entries(),
                     self.stores.counters.as_dict())

    def recover_clients(self, round_: int) -> None:
        self.stores.recover(round_)
