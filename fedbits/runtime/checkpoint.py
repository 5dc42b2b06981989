"""Checkpoints: the server's state after a completed round, written atomically.

Besides the method's server state, a checkpoint records how long ``metrics.jsonl``
and ``ledger.jsonl`` were at that point, so a resumed run first cuts off whatever a
crashed round had appended and then continues exactly where it stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedbits.errors import FedbitsError

FORMAT = 1


@dataclass
class Checkpoint:
    round: int
    server: dict[str, Any]
    file_sizes: dict[str, int]
    cum_bytes: int


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "format": FORMAT,
            "round": ckpt.round,
            "server": ckpt.server,
            "file_sizes": ckpt.file_sizes,
            "cum_bytes": ckpt.cum_bytes,
        },
        tmp,
    )
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise FedbitsError(f"no checkpoint to resume from: {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file
        raise FedbitsError(f"checkpoint {path} is unreadable: {e}") from None
    if raw.get("format") != FORMAT:
        raise FedbitsError(f"checkpoint {path} has format {raw.get('format')}, expected {FORMAT}")
    return Checkpoint(raw["round"], raw["server"], raw["file_sizes"], raw["cum_bytes"])


def truncate_to(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (what a crashed round appended is dropped)."""
    if path.exists():
        with open(path, "r+b") as f:
            f.truncate(size)
