"""The zeroth-order primitives on one flat slice of one parameter.

``w`` is always a 1-D view of elements ``start .. start+len(w)`` of a parameter whose
directions have the given ``key``. Each function runs the compiled kernel when it can
(contiguous float32 on CPU) and the torch reference otherwise; both compute the same
float operations in the same order, so results are identical. Weights are never
perturbed in place: the perturbed copies are new tensors, and ``w`` changes only in an
update, so "restoring" a weight is exact by construction.
"""

from __future__ import annotations

import numpy as np
import torch

from fedbits.zo import native
from fedbits.zo.generator import (
    Distribution,
    direction,
    indices,
    max_abs_int,
    table,
    table_ints,
)


def fill(key: int, start: int, n: int, dist: Distribution) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32)
    if native.usable(out):
        lib, t = native.loaded(), table(dist)
        lib.zo_fill(key, start, n, native.ptr(t), native.ptr(out))
        return out
    return direction(key, start, n, dist)


Pair = tuple[torch.Tensor, torch.Tensor]


def _outputs(w: torch.Tensor, out: Pair | None) -> Pair:
    return out if out is not None else (torch.empty_like(w), torch.empty_like(w))


def perturb_pair(
    key: int, start: int, w: torch.Tensor, eps: float, dist: Distribution, out: Pair | None = None
) -> Pair:
    """(w + eps·z, w - eps·z), written to ``out`` (two tensors like w) or new tensors."""
    plus, minus = _outputs(w, out)
    if native.usable(w):
        lib, t = native.loaded(), table(dist)
        lib.zo_perturb_pair(key, start, w.numel(), native.ptr(t), eps, native.ptr(w),
                            native.ptr(plus), native.ptr(minus))
        return plus, minus
    z = direction(key, start, w.numel(), dist, w.device)
    ez = torch.tensor(eps, dtype=torch.float32, device=w.device) * z
    plus.copy_(w.float() + ez)
    minus.copy_(w.float() - ez)
    return plus, minus


def update_(
    key: int, start: int, w: torch.Tensor, lr: float, g: float, wd: float, dist: Distribution
) -> None:
    """w ← w − lr·(g·z + wd·w), in place (float32 arithmetic)."""
    if native.usable(w):
        lib, t = native.loaded(), table(dist)
        lib.zo_update(key, start, w.numel(), native.ptr(t), lr, g, wd, native.ptr(w))
        return
    f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=w.device)  # noqa: E731
    z = direction(key, start, w.numel(), dist, w.device)
    x = w.float()
    w.copy_(x - f32(lr) * (f32(g) * z + f32(wd) * x))


def update_perturb(
    key_u: int, lr: float, g: float, wd: float,
    key_p: int, eps: float, start: int, w: torch.Tensor, dist: Distribution,
    out: Pair | None = None,
) -> Pair:
    """:func:`update_` with ``key_u`` then :func:`perturb_pair` with ``key_p``, fused."""
    if not native.usable(w):
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
    ``keys`` uint64, ``coefs`` int64, ``ends`` from :func:`exact_groups`."""
    if not len(keys):
        return
    if native.usable(acc):
        k = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.uint64).view(np.int64))
        cf = torch.from_numpy(np.ascontiguousarray(coefs, dtype=np.int64))
        en = torch.from_numpy(np.ascontiguousarray(ends, dtype=np.int64))
        native.loaded().zo_replay(
            len(k), native.ptr(k), native.ptr(cf), len(en), native.ptr(en),
            start, acc.numel(), native.ptr(table(dist)), native.ptr(acc),
        )
        return
    ints = torch.tensor(table_ints(dist), dtype=torch.int64, device=acc.device)
    for key, c in zip(keys.tolist(), coefs.tolist(), strict=True):
        acc += c * ints[indices(key, start, acc.numel(), acc.device)]


def apply(w0: torch.Tensor, acc: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out = w0 − scale·acc, computed in float64 and rounded once to out's dtype."""
    if native.usable(w0, acc, out) and w0.dtype == out.dtype == torch.float32:
        lib = native.loaded()
        lib.zo_apply(acc.numel(), native.ptr(w0), native.ptr(acc), scale, native.ptr(out))
        return
    out.copy_((w0.double() - scale * acc.double()).to(out.dtype))
