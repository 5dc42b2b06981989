"""Progress of long steps (evaluation, rounds, model conversion, seed replay) for a person
at a terminal and for a log read later.

On a terminal a step shows a tqdm bar on standard error, which appears only once the
step has taken a second (a quick step does not flash). Anywhere else (a pipe, a file,
a Flower log) a bar is noise, so a step logs a line such as
``evaluating: 40/64 batches (12 s)`` at most every :func:`interval_s` seconds (30 by
default, ``$FEDBITS_PROGRESS_INTERVAL`` to change): a step shorter than that logs
nothing, a long one shows it is alive and how far it got.

Both follow the caller's logger: when INFO is off for it (fedbits used as a library
with logging unconfigured, or ``fedbits -q``) there is neither bar nor line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

INTERVAL_ENV = "FEDBITS_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
BAR_DELAY_S = 1.0
HEARTBEAT_MIN_S = 1.0
"""A heartbeat ticks on its own (not on progress), so even interval 0 waits this long."""


def interval_s() -> float:
    """Seconds between progress lines off a terminal (an unusable setting: the default)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def _on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """Counts a step's units of work; see the module doc for what a person sees."""

    def __init__(self, desc: str, total: int, unit: str, logger: logging.Logger,
                 lines: bool, initial: int) -> None:
        self.desc, self.total, self.unit, self.logger = desc, total, unit, logger
        self.done = initial
        shown = logger.isEnabledFor(logging.INFO)
        terminal = _on_terminal()
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                         delay=BAR_DELAY_S) if shown and terminal else None
        self._lines = shown and lines and not terminal
        self._every = interval_s()
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            self.logger.info("%s: %d/%d %s (%.0f s)", self.desc, self.done, self.total,
                             self.unit, self._last - self._start)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def progress(desc: str, total: int, unit: str, *, logger: logging.Logger, lines: bool = True,
             initial: int = 0) -> Iterator[Progress]:
    """A :class:`Progress` for ``total`` units; ``lines=False`` when the caller logs a line
    per unit anyway (the round loop's summaries), so only the terminal bar remains."""
    bar = Progress(desc, total, unit, logger, lines, initial)
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def heartbeat(desc: str, *, logger: logging.Logger) -> Iterator[None]:
    """For a long step that reports no progress (one library call, e.g. converting a
    GGUF file): off a terminal, ``desc: still working (60 s)`` every interval while it
    runs. On a terminal the library's own bar, if any, shows it."""
    if _on_terminal() or not logger.isEnabledFor(logging.INFO):
        yield
        return
    stop = threading.Event()
    start = time.monotonic()
    every = max(interval_s(), HEARTBEAT_MIN_S)

    def tick() -> None:
        while not stop.wait(every):
            logger.info("%s: still working (%.0f s)", desc, time.monotonic() - start)

    thread = threading.Thread(target=tick, name=f"fedbits heartbeat: {desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
