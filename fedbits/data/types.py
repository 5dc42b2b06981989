"""The record every data source becomes, in a module of its own so that the loaders,
the built-in task generator, formatting and evaluation can all use it without importing
one another."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instruction example, whatever schema it came from.

    ``task`` groups examples for partitioning and unseen-task evaluation; ``answer`` is
    the exact string an exact-match metric compares against (None when the data has no
    short answer, e.g. free-form Alpaca outputs).
    """

    prompt: str
    completion: str
    task: str
    answer: str | None
