"""Where fedbits keeps what it builds once and reuses: converted models, native kernels.

A leaf module, so that a zeroth-order kernel or a model loader finds its cache without
importing the other (``fedbits.zo`` used to import ``fedbits.models``, and with it
transformers, only for this).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root of fedbits' caches: ``$FEDBITS_CACHE`` or ``~/.cache/fedbits``."""
    return Path(os.environ.get("FEDBITS_CACHE") or "~/.cache/fedbits").expanduser()


def converted_model_dir(name: str) -> Path:
    """Where a built-in model converted to a ``save_pretrained`` directory lives."""
    return cache_dir() / "models" / name


def native_kernel_dir() -> Path:
    """Where the zeroth-order kernels compiled for this machine live."""
    return cache_dir() / "zo"
