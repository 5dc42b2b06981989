"""What CG-FedLLM's halves say to each other, and the measurements both make.

Downlink body::

    u8 phase (0 TGAP, 1 FAF)
    FAF:  u32 autoencoder version | 8 bytes its digest | u8 flags (1: the weights
          follow, 2: upload the update dense too, for an audit)
          [weights: float32 tensor (dtype, count, values), the whole autoencoder]
    then the dense methods' downlink body (the adapter; fedbits.methods._dense)

Uplink body::

    u8 kind (0 dense, 1 latent)
    latent: u32 autoencoder version | f32 recon_cosine | f32 recon_rel_error
            | f32 topk_cosine | f32 topk_rel_error
            [audit: the encoded update, float32 tensor of every LoRA value]
    then the dense methods' uplink body: samples, loss and the change, through the
    TGAP chain (dense) or the autoencoder chain (latent)

A client sends dense in TGAP rounds, and in a FAF round when it holds no copy of the
announced autoencoder (its store lost it): the server then sends the weights again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedbits.compress import Chain, parse_chain
from fedbits.compress.registry import Stages, parse_stages
from fedbits.compress.stages.autoencoder import Autoencoder
from fedbits.compress.stages.autoencoder import parse as parse_autoencoder
from fedbits.errors import ClientError, WireError
from fedbits.methods.cgfedllm.options import CGFedLLMOptions
from fedbits.seeding import derive_seed
from fedbits.wire import Body, Reader, Writer

TGAP, FAF = 0, 1  # downlink phases
DENSE, LATENT = 0, 1  # uplink kinds
_WEIGHTS, _AUDIT = 1, 2  # downlink flags
DIGEST_BYTES = 8
MAX_REL_ERROR = 1e6
"""A relative error claimed above this is refused (an honest one is near 1 or below)."""
STORE_KEY = "cgfedllm-autoencoder"


def initial_stage(opts: CGFedLLMOptions, seed: int) -> Autoencoder:
    """The options' autoencoder stage at the run's seeded initialisation: both halves
    build the same one, and the weights of every trained version replace its own."""
    arguments = opts.autoencoder_entry().split(":", 1)[1]
    return parse_autoencoder(f"{arguments},seed={derive_seed(seed, 'cgfedllm-autoencoder')}")


def downlink_chain(opts: CGFedLLMOptions) -> Chain | None:
    """``method.downlink``'s chain for the adapter, None for plain ``wire_dtype`` values."""
    return parse_chain(opts.downlink, "method.downlink") if opts.downlink else None


def digest(weights: bytes) -> bytes:
    return hashlib.blake2b(weights, digest_size=DIGEST_BYTES).digest()


@dataclass(frozen=True)
class Announce:
    """A FAF downlink's header: the autoencoder in force, and what this client must do."""

    version: int
    digest: bytes
    weights: bytes | None  # little-endian float32, when this client must download them
    audit: bool


def write_downlink(announce: Announce | None, dense_body: bytes) -> bytes:
    w = Writer().u8(TGAP if announce is None else FAF)
    if announce is not None:
        flags = (_WEIGHTS if announce.weights is not None else 0) | (_AUDIT * announce.audit)
        w.u32(announce.version).raw(announce.digest).u8(flags)
        if announce.weights is not None:
            w.u8(1).u64(len(announce.weights) // 4).raw(announce.weights)  # a float32 tensor
    return w.raw(dense_body).getvalue()


def read_downlink(body: Body, what: str, num_weights: int) -> tuple[Announce | None, Body]:
    """The header (None in TGAP) and the dense body after it. The weights are checked
    for size, finiteness and against the digest announced with them."""
    r = Reader(body, what)
    phase = r.u8("phase")
    if phase not in (TGAP, FAF):
        raise WireError(f"{what}: field phase: {phase} is neither TGAP (0) nor FAF (1)")
    if phase == TGAP:
        return None, rest(body, r)
    version, announced, flags = r.u32("version"), bytes(r.raw(DIGEST_BYTES, "digest")), r.u8(
        "flags")
    if flags & ~(_WEIGHTS | _AUDIT):
        raise WireError(f"{what}: field flags: unknown bits {flags:#x}")
    if version < 1:
        raise WireError(f"{what}: field version: 0, but a FAF round needs a trained autoencoder")
    weights = None
    if flags & _WEIGHTS:
        values = r.tensor("weights", count=num_weights, dtype=torch.float32)
        if not torch.isfinite(values).all():
            raise WireError(f"{what}: field weights: non-finite values")
        weights = values.numpy().astype("<f4").tobytes()
        if digest(weights) != announced:
            raise WireError(f"{what}: field weights: they do not match the announced digest")
    return Announce(version, announced, weights, bool(flags & _AUDIT)), rest(body, r)


def rest(body: Body, r: Reader) -> Body:
    """What ``r`` has not read of ``body``, as a view."""
    return memoryview(body)[len(body) - r.remaining :]


def audited(seed: int, round_: int, client: int, fraction: float) -> bool:
    """Whether ``client`` uploads dense as well in ``round_``: seeded, so both halves
    and every runtime agree without a byte."""
    return random.Random(derive_seed(seed, "cgfedllm-audit", round_, client)).random() < fraction


# ------------------------------------------------------------------ measurements


@dataclass(frozen=True)
class Claims:
    """What a client measured on its own update and sends up as four floats."""

    recon_cosine: float
    recon_rel_error: float
    topk_cosine: float
    topk_rel_error: float

    def write(self, w: Writer) -> Writer:
        return (w.f32(self.recon_cosine).f32(self.recon_rel_error).f32(self.topk_cosine)
                .f32(self.topk_rel_error))

    @classmethod
    def read(cls, r: Reader) -> Claims:
        return cls(*(r.f32(f.name) for f in dataclasses.fields(cls)))

    def check(self, sender: str) -> None:
        """Refuse claims no computation gives: not finite, a cosine outside [-1, 1], a
        relative error below 0 or absurdly large (a top-k one above 1)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            cosine = f.name.endswith("cosine")
            high = 1 + 1e-5 if cosine or f.name == "topk_rel_error" else MAX_REL_ERROR
            low = -1 - 1e-5 if cosine else 0.0
            if not (math.isfinite(value) and low <= value <= high):
                raise ClientError(f"{sender}: claims {f.name} = {value!r}, outside "
                                  f"[{low:g}, {high:g}]")

    def as_stats(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def similarity(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cosine, ||x − y|| / ||x||) in float64; a zero x reconstructed as zero is exact."""
    a, b = x.double(), y.double()
    nx, ny = float(a.norm()), float(b.norm())
    cosine = float(a @ b) / (nx * ny) if nx and ny else float(nx == ny)
    error = float((a - b).norm())
    rel = error / nx if nx else (0.0 if error == 0 else MAX_REL_ERROR)
    return min(max(cosine, -1.0), 1.0), min(rel, MAX_REL_ERROR)


def topk_at_budget(x: torch.Tensor, budget: int, tail: Sequence[str],
                   segments: Sequence[int]) -> tuple[torch.Tensor, int]:
    """Top-k of ``x`` with the most values whose payload (top-k, then ``tail``: the
    latent's value format and byte stages) fits in ``budget`` bytes: what top-k would
    have delivered for the autoencoder's bytes. (decoded vector, payload bytes)."""
    n = x.numel()
    per_value = parse_stages(list(tail[:1]), "topk").values.nbytes(1024) / 1024
    # Elias-Fano positions cost about 2 + log2(n/k) bits each: start just under budget
    k = max(1, min(n, int((budget - 16) / (per_value + (2 + math.log2(max(n, 2))) / 8))))
    while True:
        chain = parse_chain([f"topk:{k}/{n}", *tail], "topk")
        payload = chain.encode(x, segments)
        if len(payload) <= budget or k == 1:
            return chain.decode(payload, n, segments, "top-k"), len(payload)
        k = max(1, k - max(1, math.ceil((len(payload) - budget) / per_value)))


class Tap(Chain):
    """A chain that keeps what it last encoded (a copy: error feedback changes the
    vector afterwards) and decoded, and may inspect each decoded vector before it is
    used: so cgfedllm measures reconstruction around the dense methods' halves, which
    encode and decode through the chain they are given, without changing them."""

    def __init__(self, stages: Stages) -> None:
        super().__init__(stages)
        self.stages = stages
        self.encoded: tuple[torch.Tensor, bytes, list[int] | None] | None = None
        self.decoded: torch.Tensor | None = None
        self.inspect: Callable[[torch.Tensor, int], None] | None = None

    def encode(self, x: torch.Tensor, segments: Sequence[int] | None = None,
               generator: torch.Generator | None = None) -> bytes:
        payload = super().encode(x, segments, generator)
        self.encoded = (x.detach().clone(), payload, None if segments is None else list(segments))
        return payload

    def decode(self, payload: bytes, numel: int, segments: Sequence[int] | None = None,
               what: str = "payload") -> torch.Tensor:
        y = super().decode(payload, numel, segments, what)
        if self.inspect is not None:
            self.inspect(y, len(payload))
        self.decoded = y
        return y

    def reconstruction(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(what was last encoded, what the receiver decodes of it, payload bytes)."""
        if self.encoded is None:
            raise RuntimeError("nothing was encoded through this chain")
        x, payload, segments = self.encoded
        y = self.decoded if self.decoded is not None else self.decode(
            payload, x.numel(), segments, "own payload")
        return x, y, len(payload)


def tap(entries: Sequence[str], field: str, stage: Autoencoder | None = None) -> Tap:
    """A :class:`Tap` of ``entries``, with ``stage`` (trained weights) as its values stage."""
    stages = parse_stages(entries, field)
    return Tap(stages if stage is None else dataclasses.replace(stages, values=stage))


def measure(x: torch.Tensor, y: torch.Tensor, budget: int, tail: Sequence[str],
            segments: Sequence[int]) -> tuple[Claims, int]:
    """The reconstruction figures of ``y`` for ``x``, and top-k's at the same bytes;
    (claims, top-k's payload bytes)."""
    cosine, rel = similarity(x, y)
    top, top_bytes = topk_at_budget(x, budget, tail, segments)
    top_cosine, top_rel = similarity(x, top)
    return Claims(cosine, rel, top_cosine, top_rel), top_bytes
