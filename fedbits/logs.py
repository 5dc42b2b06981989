"""How fedbits' log records reach a person: the one console handler every entry point installs.

fedbits logs through ``logging`` (one logger per module, under ``"fedbits"``) and, as a
library, shows nothing until a program configures it. Three programs do, with
:func:`configure`: the ``fedbits`` command line, the Flower ServerApp (its standard
output is the run's Flower log) and the node worker (its output is the SuperNode's
log). They all print the same plain lines on standard output, the bare message for
INFO and DEBUG and ``warning: ...`` / ``error: ...`` above: a run's progress and its
warnings are one record, which users read, pipe to a file and grep together, while
standard error stays for the command's own failure (``fedbits: error: ...``).

Standard output that closes early (``fedbits run … | head -1``) silences the rest of
the run's lines instead of stopping it: losing the output must not lose the run.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

ROOT = "fedbits"


class ConsoleHandler(logging.Handler):
    """Plain lines on standard output, warnings and errors marked by a ``warning:`` or
    ``error:`` prefix.

    The stream is looked up when a record is written, not when the handler is made, so
    output follows a later swap of ``sys.stdout`` (Flower mirrors a ServerApp's output
    into the run log that way; pytest's capture does the same).
    """

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        return self.prefix + text

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            _silence(sys.stdout)
        except Exception:
            self.handleError(record)


def _silence(stream: TextIO) -> None:
    """The reader of ``stream`` went away: send the rest to /dev/null (also what Python
    flushes at exit, which would otherwise raise again)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, ValueError):  # not a real file (a test's capture): nothing to redirect
        pass


def configure(level: int = logging.INFO, prefix: str = "") -> None:
    """Show fedbits' records at ``level`` and above through one :class:`ConsoleHandler`.

    Idempotent: calling it again (the command line run twice in one process, as tests
    do) replaces the handler instead of doubling every line. Records still propagate,
    so a program's own root handlers (pytest's ``caplog``) see them too.
    """
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler(prefix))
    logger.setLevel(level)
