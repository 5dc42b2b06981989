"""Per-client state on disk, committed together with the round's checkpoint.

Writes made during round r go to ``pending/r/<client>/``; reads see them first, then
the committed state. After the round's checkpoint is written, :meth:`ClientStores.commit`
moves them into ``committed/``. A crash at any point leaves either the old state
(round redone from scratch) or a checkpoint that names round r, whose pending writes
:meth:`recover` finishes committing, so a resumed run sees exactly what an
uninterrupted one would. Memory does not grow with the number of clients: nothing is
kept in memory between calls.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class DiskClientStore:
    def __init__(self, stores: ClientStores, client: int, round_: int) -> None:
        self._committed = stores.root / "committed" / str(client)
        self._pending = stores.root / "pending" / str(round_) / str(client)

    @staticmethod
    def _check(key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"client store key {key!r} must match {_KEY.pattern}")
        return key

    def get(self, key: str) -> bytes | None:
        for base in (self._pending, self._committed):
            path = base / self._check(key)
            if path.is_file():
                return path.read_bytes()
        return None

    def put(self, key: str, value: bytes) -> None:
        self._pending.mkdir(parents=True, exist_ok=True)
        tmp = self._pending / (self._check(key) + ".tmp")
        tmp.write_bytes(value)
        os.replace(tmp, self._pending / key)


class ClientStores:
    def __init__(self, root: Path) -> None:
        self.root = root

    def for_client(self, client: int, round_: int) -> DiskClientStore:
        return DiskClientStore(self, client, round_)

    def commit(self, round_: int) -> None:
        pending = self.root / "pending" / str(round_)
        if not pending.is_dir():
            return
        for client_dir in sorted(pending.iterdir()):
            target = self.root / "committed" / client_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in client_dir.iterdir():
                if not f.name.endswith(".tmp"):
                    os.replace(f, target / f.name)
        shutil.rmtree(pending)

    def recover(self, last_completed_round: int) -> None:
        """Finish the commit of the checkpointed round; drop writes of later rounds."""
        self.commit(last_completed_round)
        pending_root = self.root / "pending"
        if pending_root.is_dir():
            shutil.rmtree(pending_root)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
