"""Batches of tokenised examples for local training and batched generation.

A client trains a fixed number of local steps, not epochs, so that clients with very
different amounts of data do the same amount of work per round (as in FedIT and most
federated LLM papers); :func:`iterate_batches` therefore cycles through seeded epochs
until exactly ``steps`` batches have been produced.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fedbits.data.format import IGNORE_INDEX, Tokenized


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding), int64."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iterate_batches(
    items: list[Tokenized], batch_size: int, steps: int, generator: torch.Generator, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly ``steps`` batches of ``min(batch_size, len(items))`` examples.

    Indices come from back-to-back seeded permutations, so every example is seen equally
    often and a batch that crosses an epoch boundary is still full. No items, no batches.
    """
    if not items:
        return
    size = min(batch_size, len(items))
    queue: list[int] = []
    for _ in range(steps):
        while len(queue) < size:
            queue.extend(torch.randperm(len(items), generator=generator).tolist())
        batch, queue = queue[:size], queue[size:]
        yield collate([items[i] for i in batch], pad_id)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` padded on the left, so that every row's last
    position is its last prompt token and generated tokens line up across the batch."""
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask
