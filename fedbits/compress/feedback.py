"""Error feedback: what compression dropped this round is sent in a later one.

A top-k or quantising chain is biased: small coordinates never travel, and the
model drifts away from what the clients actually computed. With error feedback the
client keeps the residual (everything the receiver did not get) and adds it to its
next update, so every coordinate's mass eventually arrives: after R rounds, the sum
of what was sent plus the residual still held equals the sum of the R updates
exactly (up to float32 addition). The residual lives in the client's store, so it
survives restarts and is committed with the round's checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from fedbits.compress.chain import Chain
from fedbits.errors import ClientError


class ByteStore(Protocol):
    """Where the residual lives between rounds (a client's store)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


class ErrorFeedback:
    """The client keeps what compression dropped and adds it to its next update.

    The residual is stored under ``key`` as ``numel`` float32 values, little-endian.
    """

    def __init__(self, store: ByteStore, key: str, numel: int) -> None:
        self.store = store
        self.key = key
        self.numel = numel

    def residual(self) -> torch.Tensor:
        """What was dropped so far (zeros before the first round)."""
        raw = self.store.get(self.key)
        if raw is None:
            return torch.zeros(self.numel, dtype=torch.float32)
        if len(raw) != 4 * self.numel:
            raise ClientError(
                f"error-feedback residual {self.key!r} holds {len(raw)} bytes, expected "
                f"{4 * self.numel} ({self.numel} float32 values): stored by a different model?"
            )
        return torch.from_numpy(np.frombuffer(raw, "<f4").astype(np.float32))

    def encode(
        self,
        chain: Chain,
        x: torch.Tensor,
        *,
        segments: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> bytes:
        """Encode ``x`` plus the residual; keep what this payload does not carry."""
        if x.numel() != self.numel:
            raise ValueError(
                f"error feedback {self.key!r} is for {self.numel} values, got {x.numel()}"
            )
        corrected = x.detach().to(torch.float32).cpu() + self.residual()
        payload = chain.encode(corrected, segments, generator)
        what = f"error feedback {self.key!r}"
        if chain.is_sparse:
            idx, values = chain.decode_sparse(payload, self.numel, segments, what)
            corrected[idx] -= values
        else:
            corrected -= chain.decode(payload, self.numel, segments, what)
        self.store.put(self.key, corrected.numpy().astype("<f4", copy=False).tobytes())
        return payload
