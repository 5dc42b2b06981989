"""The compiled kernels (``_kernel.c``): built once per machine with the system C
compiler, loaded with ctypes, run on torch's own OpenMP threads.

Why not torch ops: a direction costs a hash and a table lookup per element; in torch
that is a dozen full-size int64 temporaries, slower than ``torch.randn``. The kernel
does it in registers, blocks stay in L1, and update + perturbation share one pass.
No compiler, or ``FEDBITS_ZO_NATIVE=0``: fedbits falls back to the torch reference
path (same numbers, slower) and says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from fedbits.paths import native_kernel_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]

_u64, _i64, _f32, _f64, _ptr = (
    ctypes.c_uint64, ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_void_p,
)
_SIGNATURES = {
    "zo_fill": [_u64, _i64, _i64, _ptr, _ptr],
    "zo_perturb_pair": [_u64, _i64, _i64, _ptr, _f32, _ptr, _ptr, _ptr],
    "zo_update": [_u64, _i64, _i64, _ptr, _f32, _f32, _f32, _ptr],
    "zo_update_perturb": [_u64, _f32, _f32, _f32, _u64, _f32, _i64, _i64, _ptr, _ptr, _ptr, _ptr],
    "zo_replay": [_i64, _ptr, _ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr],
    "zo_apply": [_i64, _ptr, _ptr, _f64, _ptr],
}


def _machine_tag() -> str:
    """-march=native code is only valid on this CPU: key the cached build by its flags."""
    cpu = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line for line in lines if line.startswith("flags")), "")
    except OSError:
        pass
    blob = (
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + str(_torch_openmp()).encode()
        + cpu.encode() + platform.machine().encode()
    )
    return hashlib.sha256(blob).hexdigest()[:16]


def _torch_openmp() -> Path | None:
    """The OpenMP runtime torch loaded: linking the same one shares its thread pool."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _build(target: Path) -> None:
    """Compile, then link against torch's libgomp so the kernels' parallel loops run on
    the threads torch already owns (a second OpenMP runtime would fight it for cores).
    Without one the kernels are built single-threaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    gomp = _torch_openmp()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, out = Path(tmp) / "kernel.o", Path(tmp) / target.name
        omp = ["-fopenmp"] if gomp else []
        link = [f"-L{gomp.parent}", f"-l:{gomp.name}", f"-Wl,-rpath,{gomp.parent}"] if gomp else []
        for cmd in (
            [compiler, *FLAGS, *omp, "-c", "-o", str(obj), str(SOURCE)],
            [compiler, *FLAGS, "-o", str(out), str(obj), *link],
        ):
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, target)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (torch fallback) when disabled or not buildable."""
    if os.environ.get("FEDBITS_ZO_NATIVE", "1") == "0" or sys.byteorder != "little":
        return None
    target = native_kernel_dir() / f"kernel-{_machine_tag()}.so"
    try:
        if not target.is_file():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("could not build the zeroth-order kernels (%s); using the slower "
                       "torch implementation", detail.strip()[:300])
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def loaded() -> ctypes.CDLL:
    """The loaded kernels, for a caller that has checked :func:`usable`."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native zeroth-order kernels are not loaded: check usable()")
    return lib


def usable(*tensors: torch.Tensor) -> bool:
    """Native kernels take contiguous CPU tensors (float32 weights, int64 accumulators)."""
    return library() is not None and all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype in (torch.float32, torch.int64)
        for t in tensors
    )


def ptr(t: torch.Tensor, offset: int = 0) -> int:
    return t.data_ptr() + offset * t.element_size()
