"""The two-point zeroth-order step, with every layer perturbed on the fly.

One step with seed s on a batch:

1. one forward of the batch stacked twice, ``[x; x]``: inside every layer, the first
   half sees θ + εz and the second θ − εz, built from the layer's weights as it runs
   (the weights themselves are never perturbed, so nothing needs restoring);
2. L₊ and L₋ from the two halves; g = (L₊ − L₋) / 2ε; a non-finite loss skips the step;
3. the update θ ← θ − lr·(g·z + wd·θ) (no decay on 1-D parameters: biases, norms) is
   not a pass of its own: it is owed, and paid inside the next step's forward by the
   same fused kernel that builds that step's perturbation (or by :meth:`finish`).

So a step costs one forward of a doubled batch plus, per weight, one pass that
generates two directions and writes the update: no full-size direction, gradient or
copy of the model is ever held (the largest temporaries are one layer's θ ± εz, and
big matrices are processed in row chunks). Directions come from
:mod:`fedbits.zo.generator`, keyed by (seed, parameter name).

Any device: the batch moves to the model's device, perturbations and updates run the
compiled kernels on CPU float32 and the torch reference elsewhere, with the same bits
(:mod:`fedbits.zo.kernels`). Only the losses, hence g, depend on the device (matmuls
round differently); given g, the update is the same everywhere (:meth:`apply_step`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from fedbits.errors import ModelError
from fedbits.frozen import autocast, model_device
from fedbits.zo import kernels
from fedbits.zo.generator import Distribution, param_key

CHUNK_ELEMENTS = 1 << 21  # row chunks of large matrices: bounded, cache-friendly temporaries


class _Workspace:
    """Reused buffers for θ ± εz: fresh multi-megabyte allocations each layer would cost
    page faults worth a large share of a step. Reset at every layer call."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)
        self.used = 0

    def take(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = like.numel()
        if like.dtype != torch.float32 or like.device.type != "cpu":
            return torch.empty_like(like), torch.empty_like(like)
        if self.used + 2 * n > self.buffer.numel():
            self.buffer = torch.empty(
                max(2 * self.buffer.numel(), self.used + 2 * n, 4 * CHUNK_ELEMENTS)
            )
            self.used = 0
        at = self.used
        self.used += 2 * n
        return self.buffer[at : at + n], self.buffer[at + n : at + 2 * n]


class ZeroOrderTrainer:
    """Runs two-point steps on ``model`` (in eval mode, no autograd)."""

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        lr: float,
        weight_decay: float = 0.0,
        distribution: Distribution = "gaussian",
        loss_gap_clip: float | None = None,
    ) -> None:
        self.model = model
        self.eps, self.lr, self.weight_decay = eps, lr, weight_decay
        # FedKSeed's grad_clip: a step whose |L+ - L-| exceeds it is skipped (reference)
        self.loss_gap_clip = loss_gap_clip
        self.distribution = distribution
        self.params = dict(model.named_parameters())  # tied weights appear once
        self._name_of = {id(p): n for n, p in self.params.items()}
        self._owed: dict[str, tuple[int, float]] = {}  # name -> (seed, g) of an unpaid update
        self._seed: int | None = None  # set while a step's forward runs
        self._batch = 0  # the step's batch size (the forward sees twice as many rows)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._workspace = _Workspace()

    # -- patching -------------------------------------------------------------------
    @contextmanager
    def attached(self) -> Iterator[ZeroOrderTrainer]:
        """Route the model's parameterised leaf modules through the trainer, then undo it.
        Outside a step's forward the patched modules behave exactly as before."""
        patched = []
        for mod_name, module in self.model.named_modules():
            if not list(module.parameters(recurse=False)):
                continue
            if list(module.children()):
                raise ModelError(
                    f"zeroth-order training needs parameters in leaf modules; "
                    f"{mod_name or 'the model'} ({type(module).__name__}) holds its own"
                )
            module.forward = partial(self._leaf_forward, module, module.forward)
            patched.append(module)
        try:
            yield self
        finally:
            for module in patched:
                del module.forward
            self.finish()

    def _leaf_forward(
        self, module: nn.Module, original: Any, x: torch.Tensor, *args: Any, **kwargs: Any
    ):
        if self._seed is None:
            return original(x, *args, **kwargs)
        parts = self._split(x)
        self._workspace.used = 0
        if isinstance(module, nn.Linear):
            outs = self._linear(module, parts)
        elif isinstance(module, nn.Embedding) and module.max_norm is None:
            outs = self._embedding(module, parts)
        else:
            pairs = {n: self._whole_pair(p) for n, p in module.named_parameters(recurse=False)}
            outs = []
            for half, part in enumerate(parts):
                saved = dict(module._parameters)
                # plain tensors stand in for the parameters during this call (torch
                # declares the dict as holding Parameters; forward only reads them)
                swapped = cast(dict[str, torch.Tensor | None], module._parameters)
                swapped.update({n: pm[half] for n, pm in pairs.items()})
                try:
                    outs.append(original(part, *args, **kwargs))
                finally:
                    module._parameters.update(saved)
        if x.shape[0] == 1 and self._batch > 1:  # shared input (e.g. position ids): broadcast
            outs = [o.expand(self._batch, *o.shape[1:]) for o in outs]
        return torch.cat(outs)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs of the θ+εz and θ−εz halves: the stacked batch's two halves, or the
        same tensor twice for an input shared by the whole batch."""
        if x.shape[0] == 2 * self._batch:
            return x[: self._batch], x[self._batch :]
        if x.shape[0] == 1:
            return x, x
        raise ModelError(
            f"zeroth-order step: a layer received batch {x.shape[0]}, expected "
            f"{2 * self._batch} (the stacked ± batch) or 1"
        )

    # -- perturbed views of one parameter ------------------------------------------
    def _decay(self, p: torch.Tensor) -> float:
        return self.weight_decay if p.ndim >= 2 else 0.0

    def _pair(self, name: str, p: torch.Tensor, start: int, n: int, debt: tuple[int, float] | None):
        """θ ± εz for elements start..start+n of p, paying ``debt`` on that slice first."""
        flat = p.data.view(-1)[start : start + n]
        if self._seed is None:
            raise RuntimeError(f"{name}: perturbed outside a zeroth-order step's forward")
        key = param_key(self._seed, name)
        out = self._workspace.take(flat)
        if debt is None:
            return kernels.perturb_pair(key, start, flat, self.eps, self.distribution, out)
        seed_u, g = debt
        return kernels.update_perturb(
            param_key(seed_u, name), self.lr, g, self._decay(p), key, self.eps, start, flat,
            self.distribution, out,
        )

    def _whole_pair(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        name = self._name_of[id(p)]
        plus, minus = self._pair(name, p, 0, p.numel(), self._owed.pop(name, None))
        return plus.view_as(p), minus.view_as(p)

    def _pay(self, name: str) -> None:
        seed_u, g = self._owed.pop(name)
        p = self.params[name]
        kernels.update_(param_key(seed_u, name), 0, p.data.view(-1), self.lr, g, self._decay(p),
                        self.distribution)

    def _linear(
        self, module: nn.Linear, parts: tuple[torch.Tensor, torch.Tensor]
    ) -> list[torch.Tensor]:
        w = module.weight
        name = self._name_of[id(w)]
        debt = self._owed.pop(name, None)
        bias = self._whole_pair(module.bias) if module.bias is not None else (None, None)
        rows = max(1, CHUNK_ELEMENTS // w.shape[1])
        if rows >= w.shape[0]:
            weights = self._pair(name, w, 0, w.numel(), debt)
            return [
                F.linear(x, wt.view_as(w), bs)
                for x, wt, bs in zip(parts, weights, bias, strict=True)
            ]
        outs = [x.new_empty(*x.shape[:-1], w.shape[0]) for x in parts]
        mark = self._workspace.used
        for r0 in range(0, w.shape[0], rows):
            r1 = min(r0 + rows, w.shape[0])
            self._workspace.used = mark  # this chunk's buffers replace the last one's
            weights = self._pair(name, w, r0 * w.shape[1], (r1 - r0) * w.shape[1], debt)
            for out, x, wt, bs in zip(outs, parts, weights, bias, strict=True):
                chunk_bias = None if bs is None else bs[r0:r1]
                out[..., r0:r1] = F.linear(x, wt.view(r1 - r0, w.shape[1]), chunk_bias)
        return outs

    def _embedding(
        self, module: nn.Embedding, parts: tuple[torch.Tensor, torch.Tensor]
    ) -> list[torch.Tensor]:
        """Only the rows the batch looks up are perturbed (the update still covers all)."""
        w = module.weight
        name = self._name_of[id(w)]
        if name in self._owed:
            self._pay(name)
        if self._seed is None:
            raise RuntimeError(f"{name}: perturbed outside a zeroth-order step's forward")
        rows, inverse = torch.unique(parts[0], return_inverse=True)  # both halves: same ids
        pair = kernels.perturb_rows(param_key(self._seed, name), w.data, rows, self.eps,
                                    self.distribution)
        return [F.embedding(inverse, half) for half in pair]

    # -- the step -------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self, seed: int, batch: dict[str, torch.Tensor], update: bool = True
    ) -> tuple[float, float, float | None]:
        """One two-point step; returns (L₊, L₋, g), g None when the step was skipped (a
        non-finite loss, or a loss gap beyond ``loss_gap_clip``).
        The batch may be on the CPU (as :mod:`fedbits.data.batching` makes it): it moves
        to the model's device here, the one place every caller passes through.
        ``update=False`` only estimates g at the current weights (every earlier update
        paid, none owed): FedZO averages several directions' estimates at one point
        before it moves, with :meth:`apply_step`."""
        device = model_device(self.model)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask",
                                                           "labels"))
        keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)  # logits that have a target
        extra = {"logits_to_keep": keep} if self._keep_arg else {}
        self._seed, self._batch = seed, ids.shape[0]
        try:
            with autocast(self.model):  # a no-op unless some weights are low precision
                logits = self.model(
                    input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask]),
                    **extra,
                ).logits
        finally:
            self._seed = None
        if not self._keep_arg:
            logits = logits[:, keep]
        targets = labels[:, keep + 1]
        b = ids.shape[0]
        loss_plus, loss_minus = (
            F.cross_entropy(
                logits[h * b : (h + 1) * b].flatten(0, 1).float(), targets.flatten()
            ).item()
            for h in (0, 1)
        )
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            return loss_plus, loss_minus, None
        if self.loss_gap_clip is not None and abs(loss_plus - loss_minus) > self.loss_gap_clip:
            return loss_plus, loss_minus, None
        g = (loss_plus - loss_minus) / (2 * self.eps)
        for name in list(self._owed):  # parameters this forward did not reach
            self._pay(name)
        if update:
            self._owed = {name: (seed, g) for name in self.params}
        return loss_plus, loss_minus, g

    @torch.no_grad()
    def apply_step(self, seed: int, g: float, decay: bool = True) -> None:
        """Apply the update of a step with ``seed`` and scalar ``g`` now (after paying any
        owed update): the weights :meth:`step` then :meth:`finish` leave, given that g.
        The update depends only on (seed, g, lr, wd), never on the device, so this is
        how the weights of runs whose losses (hence g) differ can still be compared.
        ``decay=False`` leaves out the weight decay: a step made of several directions'
        updates decays the weights once, not once per direction."""
        self.finish()
        if decay:
            self._owed = {name: (seed, g) for name in self.params}
            self.finish()
            return
        for name, p in self.params.items():
            kernels.update_(param_key(seed, name), 0, p.data.view(-1), self.lr, g, 0.0,
                            self.distribution)

    def finish(self) -> None:
        """Pay every owed update: afterwards the model's weights are the trained ones."""
        for name in list(self._owed):
            self._pay(name)
