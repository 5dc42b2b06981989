"""TGAP on the server: the temporal ensemble of client updates, and the autoencoder's
training on it.

The ensemble is what the autoencoder learns from: chunks of the decoded updates of
every client and round (the paper's "over clients and time"). It holds at most
``capacity`` chunks, a uniform sample of every chunk offered so far (reservoir
sampling, Algorithm R), so its memory is ``4·chunk·capacity`` bytes however many
clients, rounds or parameters there are. The slot each chunk may take is drawn from a
generator seeded by the run seed and the chunk's position in the stream, so the
ensemble is a function of what was offered, and a resumed run, which restores it from
the checkpoint, continues it exactly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbits.compress.stages.autoencoder import Autoencoder, weights_vector
from fedbits.seeding import derive_seed

logger = logging.getLogger(__name__)


class Ensemble:
    """A seeded reservoir of update chunks (raw values; each is normalised when used)."""

    def __init__(self, capacity: int, chunk: int, seed: int) -> None:
        self.capacity, self.chunk, self.seed = capacity, chunk, seed
        self.chunks = torch.zeros(0, chunk)
        self.seen = 0  # chunks offered so far

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def add(self, update: torch.Tensor) -> None:
        """Offer every chunk of the flat ``update`` (the last zero-padded)."""
        n = update.numel()
        rows = torch.zeros(-(-n // self.chunk) * self.chunk)
        rows[:n] = update.detach().to(torch.float32).cpu()
        rows = rows.view(-1, self.chunk)
        room = min(self.capacity - len(self), rows.shape[0])
        if room > 0:
            self.chunks = torch.cat([self.chunks, rows[:room]])
        later = rows[room:]
        if later.shape[0]:
            first = self.seen + room
            rng = np.random.default_rng(derive_seed(self.seed, "cgfedllm-ensemble", first))
            # chunk number i of the stream replaces slot j, uniform in [0, i], if j < capacity
            slots = np.floor(rng.random(later.shape[0]) * (first + 1 + np.arange(later.shape[0])))
            for row, slot in zip(later, slots.astype(np.int64), strict=True):
                if slot < self.capacity:
                    self.chunks[slot] = row
        self.seen += rows.shape[0]

    def state_dict(self) -> dict[str, Any]:
        return {"chunks": self.chunks.clone(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chunks = state["chunks"].clone()
        self.seen = int(state["seen"])


def train(stage: Autoencoder, ensemble: Ensemble, epochs: int, lr: float, batch: int,
          seed: int) -> tuple[torch.Tensor, float]:
    """The autoencoder of ``stage`` (its current weights as the start) trained on the
    ensemble's chunks: MSE on chunks scaled to unit RMS, Adam, shuffled by ``seed``.
    (trained weights, last epoch's mean loss). All-zero chunks (padding, untouched
    tensors) carry nothing to learn and are left out."""
    began = time.perf_counter()
    net = stage.initial_network()
    net.load_state_dict(stage.network.state_dict())
    folded, rms = stage.fold_chunks(ensemble.chunks.reshape(-1))
    data = folded[rms > 0].contiguous()
    if data.shape[0] == 0:
        logger.warning("cgfedllm: the ensemble holds no non-zero chunk; the autoencoder "
                       "stays as it was")
        return weights_vector(net), 0.0
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    mean = 0.0
    with torch.random.fork_rng(devices=[]):  # nothing here draws from it, nor disturbs it
        for _ in range(epochs):
            total = 0.0
            for idx in torch.randperm(data.shape[0], generator=gen).split(batch):
                x = data[idx]
                loss = nn.functional.mse_loss(net(x), x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * idx.numel()
            mean = total / data.shape[0]
    logger.info("cgfedllm: autoencoder trained on %d chunks of %d values, %d epochs: MSE %.4f "
                "(1.0 is a zero code) in %.1f s", data.shape[0], stage.chunk, epochs, mean,
                time.perf_counter() - began)
    return weights_vector(net), mean
