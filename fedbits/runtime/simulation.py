"""The embedded simulator: every sampled client trains in this process, one after
another, and every message is still sealed to bytes, opened and counted.

The round itself (sampling, sealing every downlink before any uplink is decoded,
ledger, rejection, metrics, checkpoints) is the shared
:class:`~fedbits.runtime.loop.RoundLoop`, and each client's side is the shared
:func:`~fedbits.runtime.client.run_client` a Flower node runs too; this runtime only
carries the bytes.

With a ``[faults]`` section the simulator also injects faults (:mod:`.faults`): a
client that drops out or misses the deadline is answered for here without training, a
crash or an attack happens inside the client's update, and the round's ``faults``
record joins its metrics row.

Nothing here grows with the number of clients: a client's store keeps at most
``runtime.client_state_mb`` in memory and the rest on disk (:mod:`.store`), and a
client's data is tokenised the first time it is sampled and kept compactly
(:mod:`.tokens`), so memory follows the data trained on, not the clients or rounds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedbits.memory import release_freed_memory
from fedbits.methods import ClientSide, get_method
from fedbits.progress import progress
from fedbits.runtime.client import Reply, run_client
from fedbits.runtime.faults import ClientFault, FaultPlan, RandomBytes, RoundFaults
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
        self.client: ClientSide = get_method(self.cfg.method.name).client(
            setup.method_context(last_half=True))
        setup.release_base()  # both halves are built
        self.faults = FaultPlan(self.cfg) if self.cfg.faults is not None else None
        self.round_faults: RoundFaults | None = None
        if self.faults is not None:
            self.client = RandomBytes(self.client)
        self.stores = ClientStores(run_dir / "client_store",
                                   int(self.cfg.runtime.client_state_mb * 1_000_000))
        self.tokens = TokenCache(setup.tokenize, setup.clients)

    def exchange(self, round_: int, downlinks: dict[int, bytes], settle: Settle) -> None:
        """Train each client on its downlink and settle it before training the next, so
        a round holds one uplink at a time."""
        # a round of many clients on a large model takes a long time between summaries
        with progress(f"round {round_}", len(downlinks), "clients", logger=logger) as shown:
            for client, downlink in downlinks.items():
                reply = self._train(round_, client, downlink)
                release_freed_memory()  # what the client built its uplink with
                settle(client, downlink, reply)
                del reply  # its uplink, decoded and folded in
                release_freed_memory()
                shown.update()

    def run_round(self, round_: int) -> dict[str, Any]:
        if self.faults is None:
            return super().run_round(round_)
        self.round_faults = self.faults.new_round()
        row = super().run_round(round_)
        row["faults"] = self.round_faults.as_row()
        self.round_faults = None
        return row

    def _train(self, round_: int, client: int, downlink: bytes) -> Reply:
        if self.faults is None:
            return self._update(round_, client, downlink, ClientFault())
        fault = self.faults.plan(round_, client)
        reply = (Reply(error=fault.missing) if fault.missing
                 else self._update(round_, client, downlink, fault))
        assert self.round_faults is not None  # run_round opened the round's record
        self.round_faults.record(client, fault, reply.uplink is not None)
        return reply

    def _update(self, round_: int, client: int, downlink: bytes, fault: ClientFault) -> Reply:
        try:
            items, truncated = self.tokens.get(client)
            data = client_data(self.setup, items, round_, client)
            data.injected = fault.injected
            store = self.stores.for_client(client, round_)
            reply = run_client(self.client, self.cfg.method.name, round_, client, downlink,
                               data, store, self.setup.max_payload_bytes)
        except Exception as e:  # a bad client never stops the round
            self.stores.discard(round_, client)  # nor leaves half a round in its store
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
