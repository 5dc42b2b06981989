"""What FedKSeed's two halves share: the seed pool, the messages, the model digest.

Downlink body: full u8 (1: the whole pool, replacing whatever the client holds; 0: the
changes since its last verified sync) | pool entries (absolute published values)
[FedKSeed-Pro: u8 flag | K importance levels (u8), raw or zstd (flag 1)].

Uplink body: num_samples u32 | train_loss f32 | model digest u32 | form u8
(0: the τ (index, scalar) pairs in step order, 1: touched pool entries, summed) | entries.

The digest is a CRC-32 of the client's replayed weights: the server refuses an
update computed on a model that is not bit-identical to its own.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from torch import nn

from fedbits.compress.stages.zstd import decompress_bounded
from fedbits.errors import WireError
from fedbits.methods.base import ClientUpdate
from fedbits.methods.fedkseed.wire import EntryFormat, decode_entries, encode_entries
from fedbits.seeding import derive_seed
from fedbits.wire import Reader, Writer

STEPS, TOUCHED = 0, 1


def pool_seeds(run_seed: int, num_seeds: int) -> list[int]:
    """The K candidate seeds, drawn once from the run seed (every node derives the same)."""
    rng = random.Random(derive_seed(run_seed, "fedkseed-pool"))
    return [rng.getrandbits(63) for _ in range(num_seeds)]


def model_digest(model: nn.Module) -> int:
    """CRC-32 of the weights' bytes, one tensor at a time (a model on an accelerator is
    read back a tensor at a time: replay gives the same bits on every device, so server
    and client digests agree whichever device each runs on)."""
    crc = 0
    for _, p in model.named_parameters():
        host = p.detach().to("cpu").contiguous()
        crc = zlib.crc32(host.view(torch.uint8).numpy().data, crc)
    return crc


# ---------------------------------------------------------------------------- downlink
def encode_downlink(
    full: bool, indices: np.ndarray, values: np.ndarray, fmt: EntryFormat, num_seeds: int,
    importance: np.ndarray | None,
) -> bytes:
    w = Writer().u8(int(full))
    encode_entries(w, indices, values, num_seeds, fmt, unique=True)
    if importance is not None:
        raw = importance.astype(np.uint8).tobytes()
        packed = zstandard.ZstdCompressor(level=19).compress(raw)
        w.u8(1).blob(packed) if len(packed) + 4 < len(raw) else w.u8(0).raw(raw)
    return w.getvalue()


def decode_downlink(
    r: Reader, fmt: EntryFormat, num_seeds: int, pro: bool
) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray | None]:
    full = r.u8("full")
    if full > 1:
        raise WireError(f"{r.what}: field full is {full}, expected 0 or 1")
    indices, values = decode_entries(r, num_seeds, fmt, r.what, max_count=num_seeds)
    importance = None
    if pro:
        flag = r.u8("importance flag")
        if flag == 0:
            raw = r.raw(num_seeds, "importance")
        elif flag == 1:
            # bounded: a frame declaring gigabytes is refused before anything is allocated
            raw = decompress_bounded(r.blob("importance"), num_seeds, r.what, "importance")
            if len(raw) != num_seeds:
                raise WireError(f"{r.what}: importance has {len(raw)} levels, expected {num_seeds}")
        else:
            raise WireError(f"{r.what}: importance flag {flag} is not 0 or 1")
        importance = np.frombuffer(raw, dtype=np.uint8).copy()
    r.finish()
    return bool(full), indices, values, importance


# ---------------------------------------------------------------------------- uplink
@dataclass
class SeedUpdate(ClientUpdate):
    digest: int
    form: int
    indices: np.ndarray  # int64
    values: np.ndarray  # float64, as the server decoded them


def encode_uplink(
    num_samples: int, train_loss: float, digest: int, steps: list[tuple[int, float]],
    fmt: EntryFormat, num_seeds: int, steps_only: bool,
) -> bytes:
    """Steps list or touched entries, whichever encodes smaller (steps only for Pro,
    whose server keeps a per-step history)."""
    idx = np.array([i for i, _ in steps], dtype=np.int64)
    val = np.array([g for _, g in steps], dtype=np.float64)
    head = Writer().u32(num_samples).f32(train_loss).u32(digest).getvalue()
    as_steps = Writer().u8(STEPS)
    encode_entries(as_steps, idx, val, num_seeds, fmt, unique=False)
    best = as_steps.getvalue()
    if not steps_only:
        touched, inverse = np.unique(idx, return_inverse=True)
        sums = np.zeros(len(touched), dtype=np.float64)
        np.add.at(sums, inverse, val)
        as_touched = Writer().u8(TOUCHED)
        encode_entries(as_touched, touched, sums, num_seeds, fmt, unique=True)
        if len(as_touched.getvalue()) < len(best):
            best = as_touched.getvalue()
    return head + best


def decode_uplink(
    r: Reader, client: int, fmt: EntryFormat, num_seeds: int, max_steps: int
) -> SeedUpdate:
    num_samples = r.u32("num_samples")
    train_loss = r.f32("train_loss")
    digest = r.u32("model digest")
    form = r.u8("form")
    if form not in (STEPS, TOUCHED):
        raise WireError(f"{r.what}: form {form} is neither steps (0) nor touched entries (1)")
    limit = max_steps if form == STEPS else min(max_steps, num_seeds)
    indices, values = decode_entries(r, num_seeds, fmt, r.what, max_count=limit)
    r.finish()
    if len(indices) > max_steps:
        raise WireError(f"{r.what}: {len(indices)} entries for at most {max_steps} local steps")
    return SeedUpdate(client, num_samples, train_loss, digest, form, indices, values)
