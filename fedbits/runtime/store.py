"""Per-client state kept between rounds, committed together with the round's checkpoint.

Disk is the record. Writes made during round r go to ``pending/r/<client>/``; reads see
them first, then the committed state. After the round's checkpoint is written,
:meth:`ClientStores.commit` moves them into ``committed/``. A crash at any point leaves
either the old state (round redone from scratch) or a checkpoint that names round r,
whose pending writes :meth:`ClientStores.recover` finishes committing, so a resumed run
sees exactly what an uninterrupted one would.

In front of the disk sits a memory layer of at most ``budget_bytes`` of values
(``runtime.client_state_mb`` in the simulator): reads are answered from memory when
they can, and when a write or a read would take memory over the budget the least
recently used values are spilled (dropped from memory: they are on disk already). So
memory is bounded by the budget whatever the number of clients, and a client sampled
again soon reads its state without touching the disk.

Writes go through to disk at once, not when they are spilled or committed. The round's
writes must be on disk before the checkpoint that names the round, or a crash between
that checkpoint and :meth:`~ClientStores.commit` would resume without them; writing
through keeps that true without any hook into the round loop, and costs no more disk
writes than writing them back later would (every write of a round must reach the disk
before its checkpoint either way). Budget 0 is the disk store alone.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")

_Slot = tuple[int | None, int, str]
"""A value in memory: (round of a pending write, or None once committed; client; key)."""


def _check(key: str) -> str:
    """``key`` when it is a plain file name: a key is never a path (``../x``, ``a/b``)."""
    if not _KEY.match(key):
        raise ValueError(f"client store key {key!r} must match {_KEY.pattern}")
    return key


@dataclass
class StoreCounters:
    """What the memory layer did, for tests and benchmarks."""

    hits: int = 0  # reads answered from memory
    disk_reads: int = 0  # reads that went to disk (whether or not the key was there)
    disk_writes: int = 0  # values written (one file each)
    spills: int = 0  # values dropped from memory to stay within the budget (already on disk)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ClientStoreView:
    """One client's store for one round: what a method's client half reads and writes."""

    def __init__(self, stores: ClientStores, client: int, round_: int) -> None:
        self._stores = stores
        self._client = client
        self._round = round_

    def get(self, key: str) -> bytes | None:
        return self._stores.get(self._round, self._client, _check(key))

    def put(self, key: str, value: bytes) -> None:
        self._stores.put(self._round, self._client, _check(key), value)


class ClientStores:
    """Every client's store under ``root``, with at most ``budget_bytes`` of values in memory.

    A ``ClientStores`` owns its directory: pending writes of this process are tracked
    (so a read of committed state needs no look at the disk for a pending file), and
    pending writes a previous process left are looked for on disk until
    :meth:`recover` has settled them.
    """

    def __init__(self, root: Path, budget_bytes: int = 0) -> None:
        if budget_bytes < 0:
            raise ValueError(f"client store budget must be >= 0 bytes, got {budget_bytes}")
        self.root = root
        self.budget_bytes = budget_bytes
        self.counters = StoreCounters()
        self._memory: OrderedDict[_Slot, bytes] = OrderedDict()  # least recently used first
        self._memory_bytes = 0
        # (client, key) this process wrote in each uncommitted round: bounded by one
        # round's clients, and emptied when the round commits
        self._written: dict[int, set[tuple[int, str]]] = {}
        self._foreign_pending = (root / "pending").is_dir()

    def for_client(self, client: int, round_: int) -> ClientStoreView:
        return ClientStoreView(self, client, round_)

    # -- paths ----------------------------------------------------------------------
    def _pending_dir(self, round_: int, client: int) -> Path:
        return self.root / "pending" / str(round_) / str(client)

    def _committed_dir(self, client: int) -> Path:
        return self.root / "committed" / str(client)

    # -- memory -----------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of values held in memory now; never more than ``budget_bytes``."""
        return self._memory_bytes

    def memory_entries(self) -> int:
        return len(self._memory)

    def _drop(self, slot: _Slot) -> bytes | None:
        value = self._memory.pop(slot, None)
        if value is not None:
            self._memory_bytes -= len(value)
        return value

    def _remember(self, slot: _Slot, value: bytes) -> None:
        """Keep ``value`` as the most recently used, spilling the least recently used
        until it fits. A value larger than the whole budget is not kept at all, nor is an
        empty one: only value bytes count against the budget, so empty values could
        otherwise pile up beyond it."""
        self._drop(slot)
        if not value or len(value) > self.budget_bytes:
            return
        while self._memory_bytes + len(value) > self.budget_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)
            self.counters.spills += 1
        self._memory[slot] = value
        self._memory_bytes += len(value)

    def _recall(self, slot: _Slot) -> bytes | None:
        value = self._memory.get(slot)
        if value is not None:
            self._memory.move_to_end(slot)
            self.counters.hits += 1
        return value

    def _read_file(self, path: Path) -> bytes | None:
        self.counters.disk_reads += 1
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    # -- reads and writes -------------------------------------------------------------
    def get(self, round_: int, client: int, key: str) -> bytes | None:
        """``key`` as client ``client`` sees it in round ``round_``: its own write of this
        round if there is one, else the committed value, else None."""
        pending: _Slot = (round_, client, key)
        if (value := self._recall(pending)) is not None:
            return value
        if self._foreign_pending or (client, key) in self._written.get(round_, ()):
            value = self._read_file(self._pending_dir(round_, client) / key)
            if value is not None:
                self._remember(pending, value)
                return value
        committed: _Slot = (None, client, key)
        if (value := self._recall(committed)) is not None:
            return value
        value = self._read_file(self._committed_dir(client) / key)
        if value is not None:
            self._remember(committed, value)
        return value

    def put(self, round_: int, client: int, key: str, value: bytes) -> None:
        """Write through to ``pending/round_/client/key`` (atomically, by rename), then
        keep the value in memory if the budget allows."""
        value = bytes(value)
        directory = self._pending_dir(round_, client)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (key + ".tmp")
        tmp.write_bytes(value)
        os.replace(tmp, directory / key)
        self.counters.disk_writes += 1
        self._written.setdefault(round_, set()).add((client, key))
        self._remember((round_, client, key), value)

    def discard(self, round_: int, client: int) -> None:
        """Undo ``client``'s writes of round ``round_``: its update failed, and a client
        that sent nothing must start its next round from the state it had before this
        one (as a node whose process died before committing would)."""
        written = self._written.get(round_, set())
        for key in sorted(k for c, k in written if c == client):
            self._drop((round_, client, key))
            written.discard((client, key))
        shutil.rmtree(self._pending_dir(round_, client), ignore_errors=True)

    # -- commit and recovery ------------------------------------------------------------
    def commit(self, round_: int) -> None:
        """Round ``round_`` is checkpointed: its writes become the committed state, on disk
        (by rename) and in memory (the pending value takes the committed one's place)."""
        self._written.pop(round_, None)
        pending = self.root / "pending" / str(round_)
        if not pending.is_dir():
            return
        for client_dir in sorted(pending.iterdir()):
            target = self.root / "committed" / client_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in client_dir.iterdir():
                if f.name.endswith(".tmp"):
                    continue
                os.replace(f, target / f.name)
                if client_dir.name.isdigit():
                    self._promote(round_, int(client_dir.name), f.name)
        shutil.rmtree(pending)

    def _promote(self, round_: int, client: int, key: str) -> None:
        """The memory side of committing one value: the old committed value goes, the
        round's value (when still in memory) becomes the committed one."""
        self._drop((None, client, key))
        value = self._drop((round_, client, key))
        if value is not None:
            self._memory[(None, client, key)] = value
            self._memory_bytes += len(value)

    def recover(self, last_completed_round: int) -> None:
        """Finish the commit of the checkpointed round; drop writes of later rounds."""
        self.commit(last_completed_round)
        pending_root = self.root / "pending"
        if pending_root.is_dir():
            shutil.rmtree(pending_root)
        for slot in [s for s in self._memory if s[0] is not None]:
            self._drop(slot)
        self._written.clear()
        self._foreign_pending = False

    def size_bytes(self) -> int:
        """Bytes on disk (every committed and pending value)."""
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
