"""Each client's tokenised data, built the first time the client is sampled and reused.

Tokenising is the same work every time a client is sampled again, so the simulator
does it once per client. What is kept is compact: one client's token ids and labels as
two flat int32 arrays plus offsets, 8 bytes per token, where the
:class:`~fedbits.data.format.Tokenized` lists cost 16 bytes per token and more (a
pointer in each list and, for ids above 256, an int object each).
Memory therefore grows with the data clients have trained on, which is bounded by the
data set, not with rounds or the number of clients.

:meth:`TokenCache.get` builds fresh ``Tokenized`` items from the arrays each time: the
same values as tokenising again (so training is unchanged, bit for bit), and lists a
method may hold or change without touching the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedbits.data.format import Tokenized
from fedbits.data.types import Example

Tokenize = Callable[[list[Example]], tuple[list[Tokenized], int]]
"""``examples -> (items, how many were truncated)``, e.g. :meth:`RunSetup.tokenize`."""


@dataclass(frozen=True)
class _Packed:
    """One client's items, flat: item ``i`` is ``ids[starts[i]:starts[i + 1]]``."""

    ids: np.ndarray  # int32, every item's input_ids back to back
    labels: np.ndarray  # int32, aligned with ids
    starts: np.ndarray  # int64, len(items) + 1 offsets
    prompt_lens: np.ndarray  # int64
    truncated_flags: np.ndarray  # bool
    truncated: int

    @classmethod
    def pack(cls, items: list[Tokenized], truncated: int) -> _Packed:
        lengths = [len(item.input_ids) for item in items]
        for item, n in zip(items, lengths, strict=True):
            if len(item.labels) != n:
                raise ValueError(f"a tokenised item has {n} input ids but "
                                 f"{len(item.labels)} labels")
        starts = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])

        def flat(rows: list[list[int]]) -> np.ndarray:
            # int32 holds every vocabulary; a value outside it raises, never wraps
            return np.array([v for row in rows for v in row], dtype=np.int32)

        return cls(
            ids=flat([item.input_ids for item in items]),
            labels=flat([item.labels for item in items]),
            starts=starts,
            prompt_lens=np.array([item.prompt_len for item in items], dtype=np.int64),
            truncated_flags=np.array([item.truncated for item in items], dtype=bool),
            truncated=truncated,
        )

    def unpack(self) -> list[Tokenized]:
        ids, labels, starts = self.ids.tolist(), self.labels.tolist(), self.starts.tolist()
        return [
            Tokenized(
                input_ids=ids[starts[i]:starts[i + 1]],
                labels=labels[starts[i]:starts[i + 1]],
                prompt_len=int(self.prompt_lens[i]),
                truncated=bool(self.truncated_flags[i]),
            )
            for i in range(len(starts) - 1)
        ]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ids, self.labels, self.starts, self.prompt_lens,
                                      self.truncated_flags))


class TokenCache:
    """``get(client)``: the client's tokenised examples and how many were cut, tokenised
    on the first call for that client only."""

    def __init__(self, tokenize: Tokenize, clients: Sequence[list[Example]]) -> None:
        self._tokenize = tokenize
        self._clients = clients
        self._packed: dict[int, _Packed] = {}
        self.tokenized = 0  # clients tokenised so far (each once)

    def get(self, client: int) -> tuple[list[Tokenized], int]:
        packed = self._packed.get(client)
        if packed is None:
            items, truncated = self._tokenize(self._clients[client])
            packed = _Packed.pack(items, truncated)
            self._packed[client] = packed
            self.tokenized += 1
        return packed.unpack(), packed.truncated

    def nbytes(self) -> int:
        """Bytes of token arrays held (the arrays' data, not Python's overhead)."""
        return sum(p.nbytes for p in self._packed.values())
