"""Giving freed memory back to the operating system between clients.

glibc's allocator raises its mmap threshold to the size of the largest block freed
(up to 32 MB), so after the first round nearly every tensor of a model the size of
smollm2 lives in its heaps, and what a client frees (optimizer state, its change,
the bytes of its messages) stays resident until something reuses it. A round's
peak RSS then counts those freed gigabytes on top of what is live. Trimming the
heaps after each client keeps resident memory close to live memory; it costs
milliseconds and changes no value. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:  # the C library this process runs on (no subprocess, as find_library would use)
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018  (absent outside glibc: musl, macOS)
    except (OSError, AttributeError):
        logger.debug("no glibc malloc_trim here: freed memory is left to the allocator")
        return None
    return libc


def release_freed_memory() -> None:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
