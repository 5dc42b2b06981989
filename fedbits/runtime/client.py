"""A client's side of a round, the same in every runtime.

The simulator (:mod:`.simulation`) and a Flower node (:mod:`.flower.node`) both call
:func:`run_client`: open the downlink's envelope (size limit first, then checksum,
method, round, direction), hand the body to the method's client half, seal the body
it returns. One function on both sides is what makes a method's bytes, and the
errors a bad payload gets, identical in the simulator and on real nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedbits.errors import FedbitsError
from fedbits.methods import ClientData, ClientResult, ClientSide, ClientStore
from fedbits.wire import Direction, open_envelope, seal


@dataclass
class Reply:
    """What came back from one client: its sealed uplink, or why there is none."""

    uplink: bytes | None = None
    error: str = ""
    stats: dict[str, float] = field(default_factory=dict)  # what the method measured
    truncated: int = 0  # the client's training examples that max_length cut


def checked_stats(stats: Any, what: str) -> dict[str, float]:
    """``stats`` checked to be finite numbers by name (ints stay ints: a count reads as
    one in ``metrics.jsonl``), or an error naming ``what``: a node's report is never
    trusted to be well-formed."""
    if not isinstance(stats, dict):
        raise FedbitsError(f"{what}: stats must be a dict of numbers, got {type(stats).__name__}")
    out: dict[str, float] = {}
    for key, value in stats.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise FedbitsError(f"{what}: stat {key!r} is {value!r}, not a finite number")
        out[str(key)] = value
    return out


def run_client(
    half: ClientSide, method: str, round_: int, client: int, downlink: bytes,
    data: ClientData, store: ClientStore, limit: int,
) -> Reply:
    """One client's round: the sealed uplink for the sealed ``downlink``, and the stats
    its half measured. Raises on anything that rejects the client (the caller records
    why); ``limit`` is ``runtime.max_payload_mb`` in bytes, held in both directions."""
    body = open_envelope(downlink, method=method, round_=round_, direction=Direction.DOWN,
                         limit=limit, what=f"downlink to client {client}")
    result = half.update(round_, client, body, data, store)
    if not isinstance(result, ClientResult):
        raise FedbitsError(f"method {method!r}: its client half returned a "
                           f"{type(result).__name__}, not a ClientResult")
    uplink = seal(method, round_, Direction.UP, result.body, limit=limit,
                  what=f"client {client} uplink")
    return Reply(uplink, stats=checked_stats(result.stats, f"client {client}"))
