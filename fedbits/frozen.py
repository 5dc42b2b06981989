"""One frozen base per process: method halves share the weights nobody trains.

A process loads the pretrained model once. Each half of a method then asks for a
model of its own (:meth:`FrozenBase.build`): a module tree of its own whose tensors
either *alias* the base (no copy, frozen, read-only) or are private copies, the ones
the half changes. So FedIT's server and client in one process hold one base plus two
adapters, not three models; only what trains (all of FedAvg, a block of partial
training) is copied.

What trains can keep float32 master weights while the base stays in ``model.dtype``
(``bfloat16``: half the memory of the frozen part); forwards then run under
:func:`autocast` so layers with mixed weight dtypes compute in the low precision.

When every tensor of the base has been copied by the halves (FedAvg, FedKSeed),
:meth:`release` drops the base; its pretrained values are read back one tensor at a
time from the checkpoint on disk when a method asks (:meth:`tensor`), e.g. FedKSeed's
replay ``w = w0 - lr * U``. A base with no checkpoint on disk (random models, GGUF
files) stays in memory.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

Copied = Callable[[str], bool]
"""Which parameters (by name) a half gets private copies of; the rest alias the base."""


def copy_all(name: str) -> bool:
    return True


def copy_none(name: str) -> bool:
    return False


def resolve_device(device: str) -> torch.device:
    """``model.device`` as a torch device: ``auto`` is cuda, then mps, then cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device = {device!r}, but this torch build sees no CUDA device")
    if resolved.type == "cuda" and resolved.index is not None:
        if resolved.index >= torch.cuda.device_count():
            raise RuntimeError(f"model.device = {device!r}, but only "
                               f"{torch.cuda.device_count()} CUDA devices are visible")
    return resolved


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def autocast(model: nn.Module) -> Any:
    """Low-precision autocast for a model whose frozen weights are bfloat16/float16,
    so float32 master weights (what trains) and low-precision frozen ones mix in one
    forward; a float32 model runs as it is (bit for bit what it did before)."""
    dtypes = {p.dtype for p in model.parameters()}
    low = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    if not low:
        return nullcontext()
    return torch.autocast(model_device(model).type, dtype=low[0])


class FrozenBase:
    """The pretrained model of this process, shared by every half built from it."""

    def __init__(self, model: nn.Module, checkpoint_dir: Path | None = None) -> None:
        model.requires_grad_(False)
        self._model: nn.Module | None = model
        self.device = model_device(model)
        self.dtype = next(model.parameters()).dtype
        self.checkpoint_dir = checkpoint_dir if _has_safetensors(checkpoint_dir) else None
        self.names = [n for n, _ in model.named_parameters()]  # tied weights appear once
        self._aliased = False  # whether a half built so far shares some base tensor

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("the frozen base was released: build every half before release()")
        return self._model

    @property
    def released(self) -> bool:
        return self._model is None

    def build(
        self, copied: Copied = copy_all, master_dtype: torch.dtype | None = None,
        take: bool = False,
    ) -> Any:
        """A module tree of its own over the base: every parameter and buffer is the base's
        own tensor, frozen, except those ``copied`` says yes to, which :func:`own` makes
        private and trainable. Never write to an aliased tensor: every half in the process
        would see it.

        ``take``: this is the last half the process builds. When it copies every tensor
        in the base's own dtype and the base can be read back from disk, it takes the
        base's tensors instead of copying them and the base is released: a node running
        FedAvg or FedKSeed holds one model, not two."""
        base = self.model
        memo: dict[int, Any] = {id(t): t for t in (*base.parameters(), *base.buffers())}
        model = copy.deepcopy(base, memo)
        names = [n for n in self.names if copied(n)]
        same_dtype = master_dtype is None or master_dtype == self.dtype
        if take and len(names) == len(self.names) and same_dtype and self._can_release():
            model.requires_grad_(True)
            self._model = None
            logger.debug("the last half took the frozen base's tensors; pretrained values "
                         "are now read from %s", self.checkpoint_dir)
            return model
        own(model, names, master_dtype)
        self._aliased = self._aliased or len(names) < len(self.names)
        return model

    @torch.no_grad()
    def tensor(self, name: str) -> torch.Tensor:
        """The pretrained value of parameter ``name`` on the base's device (read-only):
        the base's own tensor while it is held, else read back from the checkpoint."""
        if self._model is not None:
            return self._model.get_parameter(name).detach()
        assert self.checkpoint_dir is not None  # release() keeps the model otherwise
        from safetensors import safe_open  # transformers' own dependency

        for path in sorted(self.checkpoint_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                if name in f.keys():  # noqa: SIM118  (safe_open has keys(), no __contains__)
                    return f.get_tensor(name).to(self.device, self.dtype)
        raise KeyError(f"parameter {name!r} is not in the checkpoint {self.checkpoint_dir}")

    def release(self) -> bool:
        """Drop the base once every half of the process is built, when no half shares
        any of its tensors and its values can be read back from disk; return whether it
        was dropped."""
        if self._model is None or not self._can_release():
            return False
        self._model = None
        logger.debug("frozen base released; pretrained values now read from %s",
                     self.checkpoint_dir)
        return True

    def _can_release(self) -> bool:
        """No half shares a base tensor and the checkpoint on disk holds every one."""
        if self.checkpoint_dir is None or self._aliased:
            return False
        from safetensors import safe_open

        keys: set[str] = set()
        for path in self.checkpoint_dir.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                keys.update(f.keys())
        return set(self.names) <= keys


def _has_safetensors(path: Path | None) -> bool:
    return path is not None and path.is_dir() and any(path.glob("*.safetensors"))


def own(model: nn.Module, names: list[str], master_dtype: torch.dtype | None = None) -> None:
    """Give ``model`` private, trainable copies of the parameters ``names`` (in
    ``master_dtype`` when given: float32 master weights over a low-precision base), so
    a half may train or overwrite them without touching the shared base. Tied
    parameters stay tied."""
    wanted = set(names)
    ids = {id(p): n for n, p in model.named_parameters()}
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for leaf, p in list(module._parameters.items()):
            if p is None or ids.get(id(p)) not in wanted:
                continue
            if id(p) not in made:
                value = p.detach().to(master_dtype or p.dtype, copy=True)
                made[id(p)] = nn.Parameter(value, requires_grad=True)
            module._parameters[leaf] = made[id(p)]
