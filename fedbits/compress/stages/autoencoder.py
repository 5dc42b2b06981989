"""Values stage ``autoencoder``: a learned 1-D convolutional code (CG-FedLLM's encoder).

The vector is cut into chunks of ``chunk`` values (the last one zero-padded), each
chunk scaled to unit RMS, and the f = 1/``ratio`` consecutive values of each position
folded into f channels (a chunk becomes f channels of chunk/f positions). The encoder,
``depth`` convolutions of ``kernel`` taps over ``channels`` hidden channels, maps them
to one latent channel of chunk/f values; the decoder mirrors it. So the network's size
depends on ``ratio``, ``channels``, ``kernel`` and ``depth``, never on the model the
update comes from, and it runs on chunks in batches of bounded size.

For c values, C = ``chunk``, B = ceil(c/C) chunks, L = C·``ratio`` latent values each::

    bytes = 4·B + nbytes_latent(B·L)    float32 RMS per chunk, then the latent codes
                                        in ``latent`` (a registered value format)

so at ratio 1/64 in float32 a value costs 1/64 of its float32 bytes, plus 4 bytes per
chunk (1/1024 of them at C = 4096). The scales stay float32 whatever ``latent`` is:
one scale per chunk spans A and B factors whose sizes differ by orders of magnitude,
which a blockwise integer format would crush to zero.

There is no error bound: the code is only as good as the network's training. A stage
built from its chain entry alone holds the network at its seeded initialisation
(``version=0``), which every receiver rebuilds from the entry; a method that trains
one binds the weights with :meth:`Autoencoder.trained`, and the version and a digest
of the weights become part of :attr:`Autoencoder.wire_params`, so the chain's
fingerprint refuses a payload encoded with other weights. The decoder refuses scales
that are negative or not finite; the chain refuses decoded values that are not finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import cast

import numpy as np
import torch
from torch import nn

from fedbits.compress.codec import Buffer, StageError, ValueCodec
from fedbits.compress.options import density, int_option, parse_options
from fedbits.compress.registry import parse_stages, register_stage
from fedbits.errors import WireError

NAME = "autoencoder"
LATENT_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4")
_SCALE_BYTES = 4
_BATCH_CHUNKS = 512
"""Chunks through the network at once: activations stay a few MB whatever the vector."""


def _activation() -> nn.Module:
    return nn.GELU()


class ConvAutoencoder(nn.Module):
    """Encoder f → channels → … → 1 and decoder 1 → channels → … → f, each ``depth``
    same-length 1-D convolutions, GELU between them, linear at both ends."""

    def __init__(self, fold: int, depth: int, channels: int, kernel: int) -> None:
        super().__init__()

        def stack(first: int, last: int) -> nn.Sequential:
            widths = [first, *[channels] * (depth - 1), last]
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
                layers.append(nn.Conv1d(a, b, kernel, padding=kernel // 2))
                if i < depth - 1:
                    layers.append(_activation())
            return nn.Sequential(*layers)

        self.encoder = stack(fold, 1)
        self.decoder = stack(1, fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.decoder(self.encoder(x)))


def weights_vector(model: nn.Module) -> torch.Tensor:
    """Every parameter of ``model``, flattened in its registration order (float32)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in model.parameters()])


@torch.no_grad()
def load_weights_vector(model: nn.Module, flat: torch.Tensor) -> None:
    """The inverse of :func:`weights_vector`."""
    start = 0
    for p in model.parameters():
        p.copy_(flat[start : start + p.numel()].view_as(p))
        start += p.numel()


@dataclass(frozen=True)
class Autoencoder:
    """The ``autoencoder`` values stage; ``weights`` None is the seeded initialisation."""

    fold: int = 64  # 1/ratio
    chunk: int = 4096
    depth: int = 3
    channels: int = 16
    kernel: int = 5
    latent: str = "fp32"
    seed: int = 0
    version: int = 0
    weights: bytes | None = dataclasses.field(default=None, repr=False)

    name = NAME

    def __post_init__(self) -> None:
        if self.chunk % self.fold:
            raise StageError(f"chunk={self.chunk} is not a multiple of 1/ratio = {self.fold}")
        if self.kernel % 2 == 0:
            raise StageError(f"kernel={self.kernel} must be odd (the code keeps its length)")
        if self.weights is not None and len(self.weights) != 4 * self.num_weights:
            raise ValueError(f"{self.spec}: {len(self.weights)} bytes of weights, the network "
                             f"has {self.num_weights} float32 values")

    # -- what the chain needs ------------------------------------------------------
    @property
    def arch(self) -> str:
        """What decides the network's shape and how its code is written."""
        return (f"ratio=1/{self.fold},chunk={self.chunk},depth={self.depth},"
                f"channels={self.channels},kernel={self.kernel},latent={self.latent},"
                f"seed={self.seed}")

    @property
    def spec(self) -> str:
        return f"{NAME}:{self.arch}"

    @property
    def wire_params(self) -> str:
        trained = f",version={self.version},weights={self.digest}" if self.weights else ""
        return self.arch + trained

    def __str__(self) -> str:
        return self.spec

    @property
    def latent_per_chunk(self) -> int:
        return self.chunk // self.fold

    def chunks(self, count: int) -> int:
        return -(-count // self.chunk)

    def latent_count(self, count: int) -> int:
        """Latent values (scales not included) for ``count`` values."""
        return self.chunks(count) * self.latent_per_chunk

    def nbytes(self, count: int) -> int:
        return _SCALE_BYTES * self.chunks(count) + self.latent_codec.nbytes(
            self.latent_count(count))

    # -- the network and its weights -----------------------------------------------
    @cached_property
    def latent_codec(self) -> ValueCodec:
        return parse_stages([self.latent], f"{NAME} latent").values

    @property
    def num_weights(self) -> int:
        return sum(p.numel() for p in self._shape().parameters())

    @property
    def digest(self) -> str:
        """16 hex digits of BLAKE2b over the weights ("init" for the seeded ones)."""
        if self.weights is None:
            return "init"
        return hashlib.blake2b(self.weights, digest_size=8).hexdigest()

    def _shape(self) -> ConvAutoencoder:
        return ConvAutoencoder(self.fold, self.depth, self.channels, self.kernel)

    def initial_network(self) -> ConvAutoencoder:
        """The network at its seeded initialisation (PyTorch's default init, seeded)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._shape()

    @cached_property
    def network(self) -> ConvAutoencoder:
        net = self.initial_network()
        if self.weights is not None:
            flat = torch.from_numpy(np.frombuffer(self.weights, "<f4").astype(np.float32))
            load_weights_vector(net, flat)
        net.eval()
        net.requires_grad_(False)
        return net

    def trained(self, version: int, weights: torch.Tensor | bytes) -> Autoencoder:
        """This stage with trained ``weights`` (:func:`weights_vector` of the network,
        or its little-endian float32 bytes), published as ``version`` (>= 1)."""
        if version < 1:
            raise ValueError(f"a trained autoencoder has version >= 1, got {version}")
        if isinstance(weights, torch.Tensor):
            weights = weights.detach().to(torch.float32).cpu().numpy().astype("<f4").tobytes()
        return dataclasses.replace(self, version=version, weights=bytes(weights))

    # -- the code ------------------------------------------------------------------
    def fold_chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chunks scaled to unit RMS and folded, shape (B, f, C/f); their RMS, (B,)).
        The training set of the network is made the same way."""
        n, size = x.numel(), self.chunk
        padded = torch.zeros(self.chunks(n) * size, dtype=torch.float32)
        padded[:n] = x
        rows = padded.view(-1, size)
        rms = rows.double().pow(2).mean(dim=1).sqrt().to(torch.float32)
        safe = torch.where(rms > 0, rms, torch.ones_like(rms))
        normalised = rows / safe[:, None]
        return normalised.view(-1, self.latent_per_chunk, self.fold).transpose(1, 2), rms

    def unfold_chunks(self, folded: torch.Tensor, rms: torch.Tensor, count: int) -> torch.Tensor:
        """The inverse of :meth:`fold_chunks`: ``count`` values."""
        rows = folded.transpose(1, 2).reshape(-1, self.chunk) * rms[:, None]
        return rows.reshape(-1)[:count].contiguous()

    @torch.no_grad()
    def encode(self, values: torch.Tensor, generator: torch.Generator | None) -> list[Buffer]:
        folded, rms = self.fold_chunks(values)
        codes = torch.cat([self.network.encoder(part) for part in folded.split(_BATCH_CHUNKS)])
        scales = rms.numpy().astype("<f4")
        return [scales, *self.latent_codec.encode(codes.reshape(-1).contiguous(), generator)]

    @torch.no_grad()
    def decode(self, data: memoryview, count: int, what: str) -> torch.Tensor:
        chunks = self.chunks(count)
        rms = np.frombuffer(data, "<f4", chunks)
        if not np.isfinite(rms).all() or (rms < 0).any():
            raise WireError(f"{what}: field values.scales: a chunk scale that is negative or "
                            "not finite")
        codes = self.latent_codec.decode(data[_SCALE_BYTES * chunks :],
                                         self.latent_count(count), what)
        latent = codes.view(chunks, 1, self.latent_per_chunk)
        folded = torch.cat([self.network.decoder(part) for part in latent.split(_BATCH_CHUNKS)])
        return self.unfold_chunks(folded, torch.from_numpy(rms.astype(np.float32)), count)


def parse(argument: str | None) -> Autoencoder:
    """``autoencoder[:ratio=1/F,chunk=N,depth=N,channels=N,kernel=N,latent=FMT,seed=N]``."""
    opts = parse_options(argument, {"ratio", "chunk", "depth", "channels", "kernel", "latent",
                                    "seed"})
    fold = 64
    if "ratio" in opts:
        ratio = density(opts["ratio"])
        fold = round(1 / ratio)
        if abs(fold * ratio - 1) > 1e-9 or fold > 4096:
            raise StageError(f"ratio={opts['ratio']} must be 1/F for a whole F up to 4096")
    latent = opts.get("latent", "fp32")
    if latent not in LATENT_FORMATS:
        raise StageError(f"latent={latent!r} is not one of {', '.join(LATENT_FORMATS)}")
    return Autoencoder(
        fold=fold,
        chunk=int_option(opts, "chunk", 4096, 1, 1 << 20),
        depth=int_option(opts, "depth", 3, 1, 16),
        channels=int_option(opts, "channels", 16, 1, 1024),
        kernel=int_option(opts, "kernel", 5, 1, 63),
        latent=latent,
        seed=int_option(opts, "seed", 0, 0, 2**63 - 1),
    )


register_stage(NAME, parse, role="values",
               usage=f"{NAME}[:ratio=1/F,chunk=N,depth=N,channels=N,kernel=N,latent=FMT]")
