"""The zeroth-order primitives on one flat slice of one parameter.

``w`` is always a 1-D view of elements ``start .. start+len(w)`` of a parameter whose
directions have the given ``key``. Each function runs the compiled kernel when it can
(contiguous float32 on CPU) and the torch reference otherwise (another device, another
dtype, no compiler); both compute the same float operations in the same order, so results
are identical on every device: directions are picked by integer hashing only, each float
operation (a float32 multiply or add, a float64 subtract, one rounding to float32) is
correctly rounded by IEEE 754 on CPUs and GPUs alike, and the two paths never fuse a
multiply into an add (``-ffp-contract=off`` in C; one torch kernel per operation).
Weights are never perturbed in place: the perturbed copies are new tensors, and ``w``
changes only in an update, so "restoring" a weight is exact by construction.

The reference path works through a parameter in blocks of :data:`REFERENCE_BLOCK`
elements, so its int64 temporaries stay bounded (a few tens of MB) whatever the
parameter's size; every tensor it creates is on the parameter's device.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fedbits.zo import native
from fedbits.zo.generator import (
    Distribution,
    direction,
    indices_at,
    indices_many,
    max_abs_int,
    table,
    table_on,
)

REFERENCE_BLOCK = 1 << 21
"""Elements (or seed × element products, in replay) per block of the torch reference path."""


def _blocks(n: int, size: int = REFERENCE_BLOCK) -> Iterator[tuple[int, int]]:
    for a in range(0, n, size):
        yield a, min(a + size, n)


def _scalar(v: float, device: torch.device) -> torch.Tensor:
    """``v`` rounded to float32 once, as the C kernels' float arguments are."""
    return torch.tensor(v, dtype=torch.float32, device=device)


def fill(
    key: int, start: int, n: int, dist: Distribution, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The direction's float32 values of elements ``start .. start+n``, on ``device``."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    if native.usable(out):
        lib, t = native.loaded(), table(dist)
        lib.zo_fill(key, start, n, native.ptr(t), native.ptr(out))
        return out
    for a, b in _blocks(n):
        out[a:b] = direction(key, start + a, b - a, dist, out.device)
    return out


Pair = tuple[torch.Tensor, torch.Tensor]


def _outputs(w: torch.Tensor, out: Pair | None) -> Pair:
    return out if out is not None else (torch.empty_like(w), torch.empty_like(w))


def perturb_pair(
    key: int, start: int, w: torch.Tensor, eps: float, dist: Distribution, out: Pair | None = None
) -> Pair:
    """(w + eps·z, w - eps·z), written to ``out`` (two tensors like w) or new tensors."""
    plus, minus = _outputs(w, out)
    if native.usable(w, plus, minus):
        lib, t = native.loaded(), table(dist)
        lib.zo_perturb_pair(key, start, w.numel(), native.ptr(t), eps, native.ptr(w),
                            native.ptr(plus), native.ptr(minus))
        return plus, minus
    e = _scalar(eps, w.device)
    for a, b in _blocks(w.numel()):
        ez = e * direction(key, start + a, b - a, dist, w.device)
        x = w[a:b].float()
        plus[a:b] = x + ez
        minus[a:b] = x - ez
    return plus, minus


def perturb_rows(
    key: int, w: torch.Tensor, rows: torch.Tensor, eps: float, dist: Distribution
) -> Pair:
    """:func:`perturb_pair` of the given rows of the 2-D parameter ``w`` (whose flat
    directions have ``key``), stacked: two (len(rows), w.shape[1]) tensors. An embedding
    perturbs only the rows a batch looks up; on the reference path all rows are one
    gather (not a few kernels per row), with the same numbers."""
    dim = w.shape[1]
    plus = w.new_empty(len(rows), dim)
    minus = w.new_empty(len(rows), dim)
    if native.usable(w):
        for i, r in enumerate(rows.tolist()):
            perturb_pair(key, r * dim, w[r], eps, dist, (plus[i], minus[i]))
        return plus, minus
    elements = rows.to(w.device, torch.int64).view(-1, 1) * dim + torch.arange(
        dim, dtype=torch.int64, device=w.device)
    ez = _scalar(eps, w.device) * table_on(dist, w.device)[indices_at(key, elements)]
    x = w[rows.to(w.device)].float()
    plus.copy_(x + ez)
    minus.copy_(x - ez)
    return plus, minus


def update_(
    key: int, start: int, w: torch.Tensor, lr: float, g: float, wd: float, dist: Distribution
) -> None:
    """w ← w − lr·(g·z + wd·w), in place (float32 arithmetic)."""
    if native.usable(w):
        lib, t = native.loaded(), table(dist)
        lib.zo_update(key, start, w.numel(), native.ptr(t), lr, g, wd, native.ptr(w))
        return
    lr_, g_, wd_ = (_scalar(v, w.device) for v in (lr, g, wd))
    for a, b in _blocks(w.numel()):
        z = direction(key, start + a, b - a, dist, w.device)
        x = w[a:b].float()
        w[a:b] = x - lr_ * (g_ * z + wd_ * x)


def update_perturb(
    key_u: int, lr: float, g: float, wd: float,
    key_p: int, eps: float, start: int, w: torch.Tensor, dist: Distribution,
    out: Pair | None = None,
) -> Pair:
    """:func:`update_` with ``key_u`` then :func:`perturb_pair` with ``key_p``, fused."""
    if not native.usable(w, *(out or ())):
        update_(key_u, start, w, lr, g, wd, dist)
        return perturb_pair(key_p, start, w, eps, dist, out)
    plus, minus = _outputs(w, out)
    lib, t = native.loaded(), table(dist)
    lib.zo_update_perturb(key_u, lr, g, wd, key_p, eps, start, w.numel(), native.ptr(t),
                          native.ptr(w), native.ptr(plus), native.ptr(minus))
    return plus, minus


# ---------------------------------------------------------------------------- replay
_EXACT = 2**53  # doubles hold integers exactly below this


def exact_groups(coefs: np.ndarray, dist: Distribution) -> np.ndarray:
    """Split seeds into consecutive groups whose worst-case partial sum stays exact in a
    double; return each group's exclusive end index."""
    sizes = np.abs(coefs).astype(np.float64) * max_abs_int(dist)
    if sizes.size and sizes.max() >= _EXACT:
        raise OverflowError("a replay coefficient is too large to accumulate exactly")
    ends, total = [], 0.0
    for i, size in enumerate(sizes.tolist()):
        if total + size >= _EXACT:
            ends.append(i)
            total = 0.0
        total += size
    ends.append(len(sizes))
    return np.asarray(ends, dtype=np.int64)


def replay_(
    keys: np.ndarray, coefs: np.ndarray, ends: np.ndarray, start: int, acc: torch.Tensor,
    dist: Distribution,
) -> None:
    """acc += Σ_s coefs[s] · 4096·z_s over the slice, in exact integer arithmetic.
    ``keys`` uint64, ``coefs`` int64, ``ends`` from :func:`exact_groups` (the native
    kernel's grouping; the reference path sums in int64 directly, exact without groups,
    so both give the same integers)."""
    if not len(keys):
        return
    k = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64))
    cf = torch.from_numpy(np.ascontiguousarray(coefs, dtype=np.int64))
    if native.usable(acc):
        en = torch.from_numpy(np.ascontiguousarray(ends, dtype=np.int64))
        native.loaded().zo_replay(
            len(k), native.ptr(k), native.ptr(cf), len(en), native.ptr(en),
            start, acc.numel(), native.ptr(table(dist)), native.ptr(acc),
        )
        return
    # reference: (seeds × elements) blocks, all products gathered and summed at once
    device = acc.device
    k, cf = k.to(device), cf.to(device).view(-1, 1)
    ints = table_on(dist, device, integer=True)
    for a, b in _blocks(acc.numel()):
        per_pass = max(1, REFERENCE_BLOCK // (b - a))
        part = acc[a:b]
        for s0 in range(0, len(k), per_pass):
            s1 = s0 + per_pass
            part += (ints[indices_many(k[s0:s1], start + a, b - a)] * cf[s0:s1]).sum(0)


def _exact_device(device: torch.device) -> torch.device:
    """Where float64 arithmetic exists: MPS has none, so its tensors compute on the CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def apply(w0: torch.Tensor, acc: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out = w0 − scale·acc, computed in float64 and rounded once to out's dtype.
    ``w0`` may be any float dtype (a bfloat16 base converts to float64 exactly) and
    ``acc`` on the CPU or on ``out``'s device."""
    if native.usable(w0, acc, out) and w0.dtype == out.dtype == torch.float32:
        lib = native.loaded()
        lib.zo_apply(acc.numel(), native.ptr(w0), native.ptr(acc), scale, native.ptr(out))
        return
    device = _exact_device(out.device)
    for a, b in _blocks(out.numel()):
        x = w0[a:b].to(device, torch.float64)
        d = scale * acc[a:b].to(device, torch.float64)
        out[a:b] = (x - d).to(out.dtype)  # the one rounding
