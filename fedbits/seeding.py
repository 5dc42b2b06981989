"""Seeds derived from the run seed: the one source of every random choice in a run.

A leaf module (standard library only) so that the methods, which must draw the same
numbers as the runtime on every node, can use it without importing the runtime.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
