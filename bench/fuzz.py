"""Fuzz every decoder: a hostile or broken payload is refused, never a crash.

A payload comes from another machine, so every decoder must answer any bytes with a
documented error (:class:`~fedbits.errors.WireError` or
:class:`~fedbits.errors.ClientError`, the two docs/methods.md lets a decoder raise),
or decode them; never with another exception, a hang or an allocation far beyond
what an honest payload needs. The decoders:

* ``<method> uplink``, for every registered method (the registry's, plugins
  included, so a new method is fuzzed without editing this file): the server's
  side as the runtime opens an uplink (``RoundLoop._open_uplink``: the envelope,
  then the server half's ``decode_uplink``). Before every uplink that reaches the
  server half, the client's downlink is asked for again, as in a round.
* ``<method> downlink``: the client's side, :func:`fedbits.runtime.client.run_client`
  (the envelope, then the client half's ``update``, which decodes the body, trains
  and seals its uplink), with a fresh copy of the client's store each time.
* ``chain [...] <vector>``: :meth:`Chain.decode` (and ``decode_sparse`` for a sparse
  chain) of every registered stage alone and of the chains docs/compress.md shows.

The methods run on the tests' tiny random model (examples/tiny.toml) with their
default options and the :data:`VARIANTS` that read bodies differently, after one
real round, so the payloads fuzzed are round 2's: state kept between rounds
(FedKSeed's pool, FedCyBGD's blocks) is in them.

Each decoder gets ``--n`` payloads of each kind at each layer. Kinds: ``random``
(random bytes of random length, 0 included; half keep a random-length prefix of the
real payload, so the random part lands on length and count fields: huge declared
lengths), ``truncated`` (the real payload cut at a random point), ``bitflip`` (1-8
random bits of the real payload flipped). Layers: ``outer`` mutates the payload as
it crosses (the sealed envelope, the chain's frame), ``body`` mutates what is inside
and seals it again (or recomputes the chain's CRC), so the method's or stages' own
decoder reads it and not only a checksum.

Outcomes: ``accepted`` (decoded: a flipped bit in a float is still a float),
``rejected`` (a documented error), ``failures``: any other exception, a payload over
``TIMEOUT_S`` seconds, or one that raised the process's peak memory past
``MAX_GROWTH_MB`` resident or ``MAX_VIRTUAL_GROWTH_MB`` mapped (:class:`PeakMemory`).
A payload that raised a Python warning is counted under ``warned``; the most frequent
rejection messages show which checks the payloads reached. Seeded: the same
arguments fuzz the same payloads. Writes ``bench/results/fuzz.json``.

    python bench/fuzz.py                 # 10,000 per kind and layer (tens of minutes)
    python bench/fuzz.py --quick         # 200 each, a look (writes no file)
    python bench/fuzz.py --only fedkseed --n 2000 --out /tmp/fedkseed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import random
import re
import signal
import struct
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from fedbits.compress import available_stages, parse_chain
from fedbits.errors import ClientError, WireError
from fedbits.methods import ClientSide, ServerSide, available_methods, get_method
from fedbits.resolve import load_config
from fedbits.runtime.client import run_client
from fedbits.runtime.loop import client_data
from fedbits.runtime.setup import RunSetup, prepare_run
from fedbits.seeding import derive_seed
from fedbits.wire import Direction, open_envelope, seal

logger = logging.getLogger("bench.fuzz")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TINY = REPO / "examples" / "tiny.toml"
DEFAULT_N = 10_000
QUICK_N = 200
KINDS = ("random", "truncated", "bitflip")
LAYERS = ("outer", "body")
DOCUMENTED = (WireError, ClientError)
TIMEOUT_S = 30.0
"""A payload decoding longer than this is a failure (a hang)."""
MAX_GROWTH_MB = 64.0
"""A payload growing peak resident memory by more than this is a failure: the real
payloads here are at most 0.5 MB and decode (and train) in a few MB."""
MAX_VIRTUAL_GROWTH_MB = 1024.0
"""The same for the virtual peak (address space mapped, touched or not), looser: the
allocator reserves address space in large steps of its own."""
EXAMPLES = 5  # failures and warnings kept per decoder, with their payload's first bytes
HEX_BYTES = 48

FUZZ_ROUND = 2  # round 1 runs for real first
SETUP_OVERRIDES = ["clients.local_steps=1", "clients.batch_size=1", "clients.max_length=16",
                   "clients.optimizer=sgd"]
"""Training of an accepted downlink stays a few milliseconds on the tiny model."""
VARIANTS: dict[str, list[list[str]]] = {
    "fedkseed": [["wire=reference"], ["scalar_dtype=int8", "pool_dtype=bfloat16", "zstd=false"],
                 ["scalar_dtype=float32", "pool_dtype=float32"]],
    "fedkseed-pro": [["wire=reference"]],
    # cycle: the optimizer state travels (a step count only under the plain SGD above)
    "fedcybgd": [["download=fraction"], ["schedule=cycle", "agg_clients=3"]],
    "partial": [["uplink=[]", "wire_dtype=bfloat16"]],
    # round 2 is FAF by default (the encoder comes down, the latent goes up); audited,
    # the dense update follows the claims; TGAP, both ways dense
    "cgfedllm": [["audit_fraction=1", "latent_format=int8", "uplink=['zstd']"],
                 ["tgap_fraction=0.9"]],
}
"""Method options beyond the defaults that change how bodies are read (other entry
layouts and scalar types, another download, plain bfloat16 values), fuzzed as well."""

NUMEL, SEGMENTS = 4096, (1000, 3000, 96)
FRAME_HEAD, FRAME_CRC = 3, 4  # a chain payload: version u8, fingerprint 2, ..., CRC-32
CHAIN_CASES: list[tuple[list[str], str]] = [
    (["topk:1/16", "int8", "zstd"], "normal"),
    (["topk:1/16", "int8", "zstd"], "clustered"),  # here zstd pays: its frame is decoded
    (["topk_tensor:0.01", "fp16"], "normal"),
    (["randk:1/16", "int4:sr"], "normal"),
    (["randk:1/8", "fp16", "zstd"], "normal"),
    (["topk:1/64", "fp16"], "normal"),  # Elias-Fano positions
    (["topk:1/2"], "normal"),  # bitmask positions
    (["topk:1/256"], "clustered"),  # delta-varint positions
    (["fp16"], "normal"),
    (["int4"], "normal"),
    (["int8"], "normal"),
    (["bf16", "zstd"], "sparse"),
    (["autoencoder:ratio=1/16,chunk=512,latent=int8", "zstd"], "normal"),  # CG-FedLLM's
    (["powersgd:rank=4", "zstd"], "normal"),  # low-rank factors: the P orthonormality check
    (["hadamard", "uniform:bits=2,sr"], "normal"),  # Ro et al.'s low-bit uplink
    (["topk:1/16", "hadamard:block=64", "uniform:bits=3", "zstd"], "normal"),
    (["uniform:bits=1,block=7"], "normal"),  # codes and blocks that do not fill a byte
]
"""The chains docs/compress.md shows, and one per index coding; every registered stage
alone is added (:func:`chain_cases`)."""
NEEDS = {"uniform": "uniform:bits=4"}
"""Stages with no default spelling, as :func:`chain_cases` spells them alone."""


def _vector(kind: str) -> torch.Tensor:
    """A 4096-value update: ``normal``; ``sparse`` (7 in 8 zero: zstd compresses it);
    ``clustered`` (the largest values in one run: top-k picks adjacent positions)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUMEL, generator=gen)
    if kind == "sparse":
        x[torch.rand(NUMEL, generator=gen) < 7 / 8] = 0
    elif kind == "clustered":
        x *= 0.01
        x[2000:2300] += 10
    return x


# ------------------------------------------------------------------ what is fuzzed


@dataclass
class Target:
    """One decoder and a real payload for it."""

    name: str
    valid: bytes  # a real payload, as it crosses
    body: bytes  # what the outer framing holds
    wrap: Callable[[bytes], bytes]  # a body in a correct frame again
    decode: Callable[[bytes], object]  # raises to refuse
    reset: Callable[[], None] = lambda: None  # the state a real call meets, before each


class MemoryStore(dict[str, bytes]):
    """A client's store, in memory: one copy per call, so no payload sees another's writes."""

    def put(self, key: str, value: bytes) -> None:
        self[key] = value


def base_setup() -> RunSetup:
    """The tiny run every method's halves are built over (one frozen base for all)."""
    return prepare_run(load_config(TINY, SETUP_OVERRIDES))


def method_configs(only: str = "") -> list[tuple[str, list[str]]]:
    """(decoder name prefix, method options) of every registered method with its
    defaults and its :data:`VARIANTS`, those whose decoders' names contain ``only``."""
    configs = [(f"{name}[{', '.join(options)}]" if options else name, [f"method.name={name}", *(
        f"method.{option}" for option in options)])
        for name in available_methods() for options in [[], *VARIANTS.get(name, [])]]
    return [(label, overrides) for label, overrides in configs
            if only in f"{label} uplink" or only in f"{label} downlink"]


def method_targets(setup: RunSetup, label: str, options: list[str]) -> list[Target]:
    """The uplink and downlink decoders of the method ``options`` configure, with round
    2's real payloads."""
    cfg = load_config(TINY, [*SETUP_OVERRIDES, *options])
    name = cfg.method.name
    setup = dataclasses.replace(setup, cfg=cfg)
    spec = get_method(name)
    server, client = spec.server(setup.method_context()), spec.client(setup.method_context())
    cohort = setup.eligible_clients()[: cfg.clients_per_round()]
    stores = {c: MemoryStore() for c in cohort}
    _first_round(setup, server, client, stores)
    downs = {c: bytes(server.downlink(FUZZ_ROUND, c)) for c in cohort}  # the order rule
    me, limit = cohort[0], setup.max_payload_bytes
    data = client_data(setup, setup.tokenize(setup.clients[me])[0], FUZZ_ROUND, me)

    def sealer(direction: Direction) -> Callable[[bytes], bytes]:
        return lambda body: seal(name, FUZZ_ROUND, direction, body, limit=limit, what="fuzz")

    def receive(payload: bytes) -> bytes | None:
        return run_client(client, name, FUZZ_ROUND, me, payload, data, MemoryStore(stores[me]),
                          limit).uplink

    uplink = receive(sealer(Direction.DOWN)(downs[me]))
    assert uplink is not None  # run_client raises where it has no uplink
    up_body = bytes(open_envelope(uplink, method=name, round_=FUZZ_ROUND,
                                  direction=Direction.UP, limit=limit, what="fuzz"))
    server_side = _UplinkDecoder(server, name, me, limit)
    return [
        Target(f"{label} uplink", uplink, up_body, sealer(Direction.UP), server_side.decode,
               server_side.reset),
        Target(f"{label} downlink", sealer(Direction.DOWN)(downs[me]), downs[me],
               sealer(Direction.DOWN), receive),
    ]


def _first_round(setup: RunSetup, server: ServerSide, client: ClientSide,
                 stores: dict[int, MemoryStore]) -> None:
    """Round 1 for the clients of ``stores``, bodies only: every downlink first (the
    order rule), then each client's update, decoded and aggregated."""
    downs = {c: server.downlink(1, c) for c in stores}
    updates = [server.decode_uplink(1, c, client.update(
        1, c, downs[c], client_data(setup, setup.tokenize(setup.clients[c])[0], 1, c),
        stores[c]).body) for c in stores]
    server.aggregate(1, updates)


class _UplinkDecoder:
    """The server's side of one client's uplink, as ``RoundLoop._open_uplink`` opens it.

    The runtime decodes one uplink per downlink; here one downlink serves many uplinks,
    so it is asked for again after every uplink that reached the server half (whose
    ``decode_uplink`` may consume what ``downlink`` recorded, as FedKSeed's does)."""

    def __init__(self, server: ServerSide, method: str, client: int, limit: int) -> None:
        self.server, self.method, self.client, self.limit = server, method, client, limit
        self.reached = False

    def reset(self) -> None:
        if self.reached:
            self.server.downlink(FUZZ_ROUND, self.client)
            self.reached = False

    def decode(self, payload: bytes) -> object:
        body = open_envelope(payload, method=self.method, round_=FUZZ_ROUND,
                             direction=Direction.UP, limit=self.limit,
                             what=f"client {self.client} uplink")
        self.reached = True
        return self.server.decode_uplink(FUZZ_ROUND, self.client, body)


def chain_cases() -> list[tuple[list[str], str]]:
    """:data:`CHAIN_CASES`, then every registered stage (plugins' too) alone, a
    sparsifier at density 1/16, on the ``sparse`` vector."""
    alone = [([f"{s.name}:1/16" if s.role == "positions" else NEEDS.get(s.name, s.name)],
              "sparse") for s in available_stages()]
    return CHAIN_CASES + [case for case in alone if case not in CHAIN_CASES]


def chain_name(stages: Sequence[str], vector: str) -> str:
    """The decoder's name in logs and results: the chain as configured, and its vector."""
    return f"chain {list(stages)} {vector}"


def chain_target(stages: Sequence[str], vector: str) -> Target:
    """A chain's decoder, with the payload it encodes for the vector; a mutated body is
    framed again with a CRC that matches, so the stages' decoders read it."""
    chain = parse_chain(stages, field="fuzz")
    gen = torch.Generator().manual_seed(1)
    valid = chain.encode(_vector(vector), segments=SEGMENTS, generator=gen)
    head, context = valid[:FRAME_HEAD], _crc_context(valid)

    def wrap(body: bytes) -> bytes:
        framed = head + body
        return framed + struct.pack("<I", zlib.crc32(framed, zlib.crc32(context)))

    def decode(payload: bytes) -> object:
        if chain.is_sparse:
            chain.decode_sparse(payload, NUMEL, SEGMENTS, what="fuzz")
        return chain.decode(payload, NUMEL, SEGMENTS, what="fuzz")

    return Target(chain_name(stages, vector), valid, valid[FRAME_HEAD:-FRAME_CRC], wrap, decode)


def _crc_context(valid: bytes) -> bytes:
    """What the chain's CRC covers before the payload (docs/compress.md: numel, and the
    segment sizes for a per-tensor sparsifier), found by which one the real payload's
    CRC matches."""
    numel = struct.pack("<Q", NUMEL)
    for context in (numel, numel + np.asarray(SEGMENTS, dtype="<u8").tobytes()):
        if zlib.crc32(valid[:-FRAME_CRC], zlib.crc32(context)) == int.from_bytes(
                valid[-FRAME_CRC:], "little"):
            return context
    raise RuntimeError("no known CRC context matches the chain's payload")


# ------------------------------------------------------------------ payloads


def mutate(rng: random.Random, data: bytes, kind: str) -> bytes:
    """One fuzzed payload of ``kind`` made from the real ``data``."""
    if kind == "random":
        size = 0 if rng.random() < 1 / 16 else rng.randrange(1, 2 * len(data) + 64)
        keep = rng.randrange(min(size, len(data)) + 1) if rng.random() < 0.5 else 0
        return data[:keep] + rng.randbytes(size - keep)
    if not data:
        return data
    if kind == "truncated":
        return data[: rng.randrange(len(data))]
    flipped = bytearray(data)
    bits = 8 * len(flipped)
    for bit in rng.sample(range(bits), rng.randint(1, min(8, bits))):  # distinct: none undone
        flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


class PayloadTimeout(Exception):
    """A payload took longer than :data:`TIMEOUT_S` to decode."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise PayloadTimeout(f"no answer after {TIMEOUT_S:g} s")


class PeakMemory:
    """How much one payload raised the process's peak memory, resident and virtual.

    Linux resets the resident peak (VmHWM) on request, so each payload's is measured
    alone. The virtual peak (VmPeak) cannot be reset: it grows only when a payload
    maps more address space than anything before it, which is what an allocation far
    beyond the payload does even when it is never touched (a frame declaring 64 GB).
    Elsewhere both read 0. The two files stay open: reading them is most of what the
    harness costs per chain payload."""

    _FIELDS = re.compile(rb"VmPeak:\s+(\d+).*?VmHWM:\s+(\d+).*?VmRSS:\s+(\d+)", re.S)

    def __init__(self) -> None:
        self.available = os.access("/proc/self/clear_refs", os.W_OK)
        self.start = (0, 0, 0)
        if self.available:
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
            self._status = os.open("/proc/self/status", os.O_RDONLY)

    def _read(self) -> tuple[int, int, int]:
        """VmPeak, VmHWM and VmRSS in KiB."""
        found = self._FIELDS.search(os.pread(self._status, 1 << 14, 0))
        assert found is not None  # Linux writes all three
        peak, hwm, rss = (int(value) for value in found.groups())
        return peak, hwm, rss

    def reset(self) -> None:
        if self.available:
            os.write(self._clear, b"5")  # resident peak := resident now
            self.start = self._read()

    def growth_mb(self) -> tuple[float, float]:
        """(resident, virtual) peak growth since :meth:`reset`, in MB."""
        if not self.available:
            return 0.0, 0.0
        peak, hwm, _ = self._read()
        return (hwm - self.start[2]) / 1024, (peak - self.start[0]) / 1024


@functools.cache
def peak_memory() -> PeakMemory:
    """The process's one :class:`PeakMemory` (its files stay open for the process)."""
    return PeakMemory()


# ------------------------------------------------------------------ one decoder

ENDINGS = ("accepted", "rejected", "failures")  # each payload has exactly one
OUTCOMES = (*ENDINGS, "warned")
REASONS = 8  # the most frequent rejection messages kept per decoder
_NUMBER = re.compile(r"0x[0-9a-f]+|\d+")


@dataclass
class Outcome:
    """What decoding one payload did."""

    error: Exception | None
    warned: list[str]
    seconds: float
    resident_mb: float  # growth of the peak, as :class:`PeakMemory` measures it
    virtual_mb: float

    def verdict(self) -> Exception | None:
        """The error that counts: an allocation over the limits fails a payload that
        decoded or was refused alike."""
        if self.error is not None and not isinstance(self.error, DOCUMENTED):
            return self.error
        if self.resident_mb > MAX_GROWTH_MB:
            return MemoryError(f"peak resident memory grew by {self.resident_mb:.0f} MB")
        if self.virtual_mb > MAX_VIRTUAL_GROWTH_MB:
            return MemoryError(f"peak virtual memory grew by {self.virtual_mb:.0f} MB")
        return self.error


@dataclass
class Tally:
    """What one decoder did with its payloads."""

    counts: dict[str, dict[str, Counter[str]]] = field(
        default_factory=lambda: {k: {layer: Counter() for layer in LAYERS} for k in KINDS})
    rejected_by: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    slowest_s: float = 0.0
    resident_mb: float = 0.0
    virtual_mb: float = 0.0

    def record(self, kind: str, layer: str, index: int, data: bytes, outcome: Outcome) -> None:
        counts = self.counts[kind][layer]
        self.slowest_s = max(self.slowest_s, outcome.seconds)
        self.resident_mb = max(self.resident_mb, outcome.resident_mb)
        self.virtual_mb = max(self.virtual_mb, outcome.virtual_mb)
        if outcome.warned:
            counts["warned"] += 1
            if len(self.warnings) < EXAMPLES:
                self.warnings.append(_example(kind, layer, index, data,
                                              warnings=outcome.warned[:3]))
        error = outcome.verdict()
        if error is None:
            counts["accepted"] += 1
        elif isinstance(error, DOCUMENTED):
            counts["rejected"] += 1
            self.rejected_by[type(error).__name__] += 1
            self.reasons[_NUMBER.sub("N", str(error))[:140]] += 1
        else:
            counts["failures"] += 1
            if len(self.failures) < EXAMPLES:
                self.failures.append(_example(kind, layer, index, data,
                                              error=type(error).__name__,
                                              message=str(error)[:300], where=_where(error)))

    def as_json(self) -> dict[str, Any]:
        per_kind = {k: {layer: _summary(c) for layer, c in layers.items()}
                    for k, layers in self.counts.items()}
        total = Counter[str]()
        for layers in self.counts.values():
            for c in layers.values():
                total.update(c)
        return {
            **_summary(total), "per_kind": per_kind, "rejected_by": dict(self.rejected_by),
            "top_rejections": dict(self.reasons.most_common(REASONS)),
            "failure_examples": self.failures, "warning_examples": self.warnings,
            "slowest_payload_s": round(self.slowest_s, 4),
            "max_resident_growth_mb": round(self.resident_mb, 1),
            "max_virtual_growth_mb": round(self.virtual_mb, 1),
        }


def _summary(counts: Counter[str]) -> dict[str, int]:
    """Payloads, then each outcome (``warned`` overlaps the other three)."""
    return {"payloads": sum(counts[o] for o in ENDINGS), **{o: counts[o] for o in OUTCOMES}}


def _where(e: BaseException) -> str:
    """The innermost line of this repository the exception passed: where to look."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(REPO))] or frames
    if not ours:
        return "?"
    path = Path(ours[-1].filename)
    return f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{ours[-1].lineno}"


def _example(kind: str, layer: str, index: int, data: bytes, **what: Any) -> dict[str, Any]:
    """A payload to reproduce: where it came in the seeded stream, and its first bytes."""
    return {"kind": kind, "layer": layer, "index": index, **what, "bytes": len(data),
            "hex_prefix": data[:HEX_BYTES].hex()}


def attempt(target: Target, payload: bytes, memory: PeakMemory) -> Outcome:
    """Decode one payload, within :data:`TIMEOUT_S`."""
    target.reset()
    memory.reset()
    start = time.perf_counter()
    error: Exception | None = None
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
        try:
            target.decode(payload)
        except Exception as e:  # what the fuzz is for: anything at all is recorded
            error = e
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    return Outcome(error, [f"{w.category.__name__}: {w.message}" for w in caught], seconds,
                   *memory.growth_mb())


def fuzz(target: Target, n: int, seed: int) -> dict[str, Any]:
    """``n`` payloads of every kind at every layer through ``target``'s decoder."""
    memory = peak_memory()
    if target.wrap(target.body) != target.valid:
        raise RuntimeError(f"{target.name}: re-framing the real body does not rebuild the payload")
    rng = random.Random(derive_seed(seed, target.name))
    tally = Tally()
    began = time.perf_counter()
    refused = attempt(target, target.valid, memory).error  # and a warm-up
    if refused is not None:
        raise RuntimeError(f"{target.name}: the real payload is refused: {refused!r}")
    for kind in KINDS:
        for layer in LAYERS:
            source = target.valid if layer == "outer" else target.body
            for index in range(n):
                data = mutate(rng, source, kind)
                payload = data if layer == "outer" else target.wrap(data)
                tally.record(kind, layer, index, data, attempt(target, payload, memory))
            logger.debug("%s: %s/%s: %s", target.name, kind, layer,
                         dict(tally.counts[kind][layer]))
    result = {"valid_bytes": len(target.valid), "body_bytes": len(target.body), **tally.as_json(),
              "seconds": round(time.perf_counter() - began, 1),
              "load_average_1min": round(os.getloadavg()[0], 2)}  # the machine's, at the end
    logger.info("%s: %d payloads: %d accepted, %d rejected, %d failures (%.1f s)", target.name,
                result["payloads"], result["accepted"], result["rejected"], result["failures"],
                result["seconds"])
    return result


# ------------------------------------------------------------------ the run


def all_targets(only: str = "") -> Iterator[Target]:
    """Every decoder whose name contains ``only``: the methods' (built as they come, one
    method's halves alive at a time), then the chains'."""
    methods = method_configs(only)
    if methods:
        setup = base_setup()
        for label, options in methods:
            yield from (t for t in method_targets(setup, label, options) if only in t.name)
    for stages, vector in chain_cases():
        if only in chain_name(stages, vector):
            yield chain_target(stages, vector)


def run(n: int, seed: int, only: str = "") -> dict[str, Any]:
    """Fuzz every decoder (those whose name contains ``only``): the results file's
    contents, with the machine's load around it, since other jobs slow the figures."""
    load_before = os.getloadavg()
    logger.info("fuzzing every decoder with %d payloads per kind and layer; load average %.2f",
                n, load_before[0])
    memory = peak_memory()
    if not memory.available:
        logger.warning("peak memory cannot be reset here (no writable /proc/self/clear_refs): "
                       "memory growth is not checked")
    began = time.perf_counter()
    decoders = {t.name: fuzz(t, n, seed) for t in all_targets(only)}
    load_after = os.getloadavg()
    totals = {key: sum(d[key] for d in decoders.values()) for key in ("payloads", *OUTCOMES)}
    logger.info("%d decoders, %d payloads: %d accepted, %d rejected, %d failures; %.0f s, "
                "load average %.2f", len(decoders), totals["payloads"], totals["accepted"],
                totals["rejected"], totals["failures"], time.perf_counter() - began, load_after[0])
    return {
        "n_per_kind_and_layer": n, "seed": seed, "kinds": list(KINDS), "layers": list(LAYERS),
        "documented_errors": [e.__name__ for e in DOCUMENTED], "timeout_s": TIMEOUT_S,
        "max_resident_growth_mb": MAX_GROWTH_MB, "max_virtual_growth_mb": MAX_VIRTUAL_GROWTH_MB,
        "memory_checked": memory.available,
        "totals": {"decoders": len(decoders), **totals},
        "seconds": round(time.perf_counter() - began),
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(load_after[0], 2),
                              "max_at_a_decoder_end": max(
                                  (d["load_average_1min"] for d in decoders.values()), default=0)},
        "cpus": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
        "decoders": decoders,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None,
                        help=f"payloads per kind and layer per decoder (default {DEFAULT_N})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_N} per kind and layer; no file unless --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="fuzz the decoders whose name contains this")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/fuzz.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # tiny tensors: threads only contend with other jobs
    n = args.n or (QUICK_N if args.quick else DEFAULT_N)
    out = args.out or (None if args.quick else RESULTS / "fuzz.json")
    results = run(n, args.seed, args.only)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
