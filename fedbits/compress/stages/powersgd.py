"""Values stage ``powersgd``: a rank-r factorisation of the values by one power iteration
(Vogels et al., "PowerSGD", NeurIPS 2019).

The c values are laid out row-major as an m x n matrix M (zero-padded to m·n) and sent
as two float32 factors, P̂ (m x r, orthonormal columns) and Q (n x r), with
M ≈ P̂ Qᵀ::

    Q0 ~ N(0, 1), n x r, drawn from the chain's generator
    P  = M Q0;   P̂ = the Q of a QR decomposition of P (orthonormal columns)
    Q  = Mᵀ P̂;   receiver: M̂ = P̂ Qᵀ, read row-major, the first c values

    bytes  4·r·(m + n),  r = min(rank, m, n)

**The matrix.** A values stage sees a flat vector (the method's tensors concatenated
in layout order, or the k values a sparsifier chose), not the tensors' shapes. By
default the vector is folded into the nearest square, n = ceil(√c), m = ceil(c / n):
the fewest bytes for a given rank. ``cols=N`` sets n instead: with n the model's
hidden size, every weight matrix stored ``[out, hidden]`` (in a Llama layer q, k, v, o,
gate and up; every tensor there holds a multiple of hidden values, so none shifts the
next off the rows) lands as a band of whole rows, so M stacks them and its rank is at
most the sum of theirs. Per-tensor factors (the
paper's choice) would need the layout inside the stage; the codec protocol does not
hand it over.

**Exactness.** When M has rank at most r, P spans M's column space (almost surely,
for a Gaussian Q0), so P̂ P̂ᵀ M = M and the decoded values equal the input up to
float32 rounding. Otherwise the error is that of one power iteration from a random
start: it falls with the rank, but PowerSGD is biased, and is meant to run with error
feedback (``method.error_feedback = true`` in the dense methods), which sends what a
round's factorisation missed in a later round.

**No warm start.** The paper reuses each round's Q as the next round's Q0, which
makes one iteration approach the top singular vectors over rounds. A chain stage
holds no state between messages, so Q0 is fresh each time, drawn from the generator
the method seeds per client and round (deterministic: the same state gives the same
bytes; without a generator a fixed seed 0 is used). Error feedback makes up for it.

The decoder refuses what no encoder writes: a non-finite factor, and P̂ columns that
are not orthonormal (to 1e-3). It allocates m·n <= c + n floats, bounded by the c the
receiver expects; the chain refuses a product that overflows to inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedbits.compress.codec import Buffer
from fedbits.compress.options import int_option, parse_options
from fedbits.compress.registry import register_stage
from fedbits.errors import WireError

DEFAULT_RANK = 4
MAX_RANK = 4096
MAX_COLS = 1 << 24
ORTHONORMAL_TOLERANCE = 1e-3
"""How far from I an honest P̂ᵀP̂ can be: float32 Householder QR is off by ~1e-6·√m."""


@dataclass(frozen=True)
class PowerSGDValues:
    """Rank-``rank`` factors of the values folded into a matrix ``cols`` wide (0:
    near-square)."""

    rank: int = DEFAULT_RANK
    cols: int = 0

    name = "powersgd"

    @property
    def spec(self) -> str:
        return f"powersgd:rank={self.rank}" + (f",cols={self.cols}" if self.cols else "")

    @property
    def wire_params(self) -> str:
        return self.spec.partition(":")[2]  # rank and width decide how the bytes are read

    def __str__(self) -> str:
        return self.spec

    def shape(self, count: int) -> tuple[int, int, int]:
        """(m, n, r) for ``count`` values."""
        if count == 0:
            return 0, 0, 0
        cols = self.cols or math.isqrt(count - 1) + 1  # ceil(sqrt(count))
        rows = -(-count // cols)
        return rows, cols, min(self.rank, rows, cols)

    def nbytes(self, count: int) -> int:
        rows, cols, r = self.shape(count)
        return 4 * r * (rows + cols)

    def encode(self, values: torch.Tensor, generator: torch.Generator | None) -> list[Buffer]:
        rows, cols, r = self.shape(values.numel())
        if r == 0:
            return []
        flat = values.to(torch.float32)
        pad = rows * cols - flat.numel()
        m = (torch.cat([flat, flat.new_zeros(pad)]) if pad else flat).view(rows, cols)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        q0 = torch.randn(cols, r, generator=gen, dtype=torch.float32)
        p, _ = torch.linalg.qr(m @ q0, mode="reduced")
        q = m.T @ p
        if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
            raise ValueError("powersgd: the factors overflow float32 (values near ±3.4e38)")
        return [_le(p), _le(q)]

    def decode(self, data: memoryview, count: int, what: str) -> torch.Tensor:
        rows, cols, r = self.shape(count)
        if r == 0:
            return torch.zeros(0, dtype=torch.float32)
        split = 4 * rows * r
        p = torch.from_numpy(np.frombuffer(data[:split], "<f4").astype(np.float32))
        q = torch.from_numpy(np.frombuffer(data[split:], "<f4").astype(np.float32))
        if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
            raise WireError(f"{what}: field values.factors: non-finite value")
        p, q = p.view(rows, r), q.view(cols, r)
        gram = p.double().T @ p.double()
        if (gram - torch.eye(r, dtype=torch.float64)).abs().max() > ORTHONORMAL_TOLERANCE:
            raise WireError(f"{what}: field values.p: columns are not orthonormal, as no "
                            "powersgd encoder writes them")
        return (p @ q.T).reshape(-1)[:count].contiguous()


def _le(t: torch.Tensor) -> np.ndarray:
    """A factor as C-contiguous little-endian float32 (row-major)."""
    return np.ascontiguousarray(t.numpy(), dtype="<f4")


def _parse(argument: str | None) -> PowerSGDValues:
    opts = parse_options(argument, {"rank", "cols"})
    return PowerSGDValues(int_option(opts, "rank", DEFAULT_RANK, 1, MAX_RANK),
                          int_option(opts, "cols", 0, 1, MAX_COLS))


register_stage("powersgd", _parse, role="values", usage="powersgd[:rank=N][,cols=N]")
