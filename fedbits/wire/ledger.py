"""The byte ledger: ``len(payload)`` of every message, at the transport boundary.

One JSON row per message in ``ledger.jsonl``. Nothing is estimated: the runtime
calls :meth:`Ledger.record` with the exact payload it moved.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RoundBytes:
    up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    down: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total_up(self) -> int:
        return sum(self.up.values())

    @property
    def total_down(self) -> int:
        return sum(self.down.values())


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rounds: dict[int, RoundBytes] = defaultdict(RoundBytes)

    def record(self, round_: int, client: int, direction: str, payload: bytes | int) -> int:
        n = payload if isinstance(payload, int) else len(payload)
        book = self.rounds[round_]
        (book.up if direction == "up" else book.down)[client] += n
        with self.path.open("a") as f:
            f.write(
                json.dumps({"round": round_, "client": client, "direction": direction, "bytes": n})
                + "\n"
            )
        return n
