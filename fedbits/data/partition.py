"""Holding out evaluation data and splitting training data across simulated clients.

The client split uses flwr-datasets' partitioners so that "iid", "dirichlet" and
"natural" mean exactly what they mean in the Flower ecosystem and in the papers that use
it. Everything is seeded: the same config gives every client the same examples, which
is what makes two methods comparable on one run configuration.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from fedbits.config import DataSection
from fedbits.data.examples import load_examples
from fedbits.data.types import Example
from fedbits.errors import DataError

PARTITION_COLUMNS = ("task", "answer")
_ROW = "row"


def split_eval(
    examples: list[Example], data: DataSection, seed: int
) -> tuple[list[Example], list[Example]]:
    """``(train, eval)``. With ``data.eval_source`` that source is the whole eval set and
    every example trains; otherwise a seeded fraction of examples ("fraction") or of
    ``partition_by`` values ("unseen", for generalisation to tasks no client saw) is held out.

    Train keeps the source order; eval comes in a seeded random order, because callers
    evaluate a prefix (``eval.max_examples``) and sources are grouped by task, so a prefix
    in source order would cover only the first task or two.
    """
    if data.eval_source is not None:
        return list(examples), load_eval_source(data, seed)
    if data.eval_split == "fraction":
        train, held_out = _split_fraction(examples, data.eval_fraction, seed)
    else:
        train, held_out = _split_unseen(examples, data, seed)
    random.Random(seed).shuffle(held_out)
    return train, held_out


def load_eval_source(data: DataSection, seed: int) -> list[Example]:
    """``data.eval_source`` whole, in the seeded order :func:`split_eval` gives it: the
    evaluation set of a run whose training data is elsewhere (on the Flower nodes)."""
    if data.eval_source is None:
        raise DataError("data.eval_source is not set")
    held_out = load_examples(data.eval_source, seed=seed, builtin_per_task=data.builtin_per_task)
    random.Random(seed).shuffle(held_out)
    return held_out


def train_split(examples: list[Example], data: DataSection, seed: int) -> list[Example]:
    """:func:`split_eval`'s training side, without loading ``data.eval_source``: what a
    node partitions when it only trains (the evaluation set is the server's)."""
    if data.eval_source is not None:
        return list(examples)
    return split_eval(examples, data, seed)[0]


def _split_fraction(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    n = len(examples)
    # At least one eval example, never the whole set: both sides must stay usable.
    k = min(max(1, round(fraction * n)), n - 1) if n >= 2 else 0
    held = set(random.Random(seed).sample(range(n), k))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    return train, [ex for i, ex in enumerate(examples) if i in held]


def _split_unseen(
    examples: list[Example], data: DataSection, seed: int
) -> tuple[list[Example], list[Example]]:
    column = _check_column(data.partition_by)
    values = sorted({_key(ex, column) for ex in examples})
    if data.eval_values:
        held = set(data.eval_values)
        missing = sorted(held - set(values))
        if missing:
            raise DataError(
                f"data.eval_values: {missing} not found in column {column!r} "
                f"({len(values)} values, e.g. {values[:5]})"
            )
    else:
        if len(values) < 2:
            raise DataError(
                f"eval_split='unseen' needs at least 2 distinct {column!r} values, "
                f"found {len(values)}"
            )
        k = min(max(1, round(data.eval_fraction * len(values))), len(values) - 1)
        held = set(random.Random(seed).sample(values, k))
    train = [ex for ex in examples if _key(ex, column) not in held]
    return train, [ex for ex in examples if _key(ex, column) in held]


def partition(train: list[Example], data: DataSection, seed: int) -> list[list[Example]]:
    """Exactly ``data.num_clients`` lists of examples (some may be empty)."""
    column = _check_column(data.partition_by)
    n_clients = data.num_clients
    if data.partition == "natural":
        return _natural(train, column, n_clients)
    if not train:
        return [[] for _ in range(n_clients)]
    # flwr-datasets rejects more partitions than rows; the extra clients simply get nothing.
    n_parts = min(n_clients, len(train))
    partitioner: Partitioner
    if data.partition == "iid":
        partitioner = IidPartitioner(num_partitions=n_parts)
        # IidPartitioner takes contiguous shards, so shuffle first to make them random.
        dataset = _to_dataset(train).shuffle(seed=seed)
    else:
        # min_partition_size=0: tiny and empty clients are allowed, so the partitioner never
        # resamples (it would raise after 10 tries on a small, skewed data set).
        partitioner = DirichletPartitioner(
            num_partitions=n_parts,
            partition_by=column,
            alpha=data.alpha,
            min_partition_size=0,
            seed=seed,
        )
        dataset = _to_dataset(train)
    parts = _apply(partitioner, dataset, train, n_parts)
    return parts + [[] for _ in range(n_clients - n_parts)]


def _natural(train: list[Example], column: str, n_clients: int) -> list[list[Example]]:
    distinct = len({_key(ex, column) for ex in train})
    if distinct != n_clients:
        raise DataError(
            f"partition='natural' gives one client per distinct {column!r} value: the training "
            f"data has {distinct}, so set data.num_clients = {distinct} (got {n_clients})"
        )
    return _apply(NaturalIdPartitioner(partition_by=column), _to_dataset(train), train, n_clients)


def _apply(
    partitioner: Partitioner, dataset: datasets.Dataset, train: list[Example], n_parts: int
) -> list[list[Example]]:
    partitioner.dataset = dataset
    rows = (
        partitioner.load_partition(p).select_columns([_ROW]).to_dict()[_ROW] for p in range(n_parts)
    )
    return [[train[i] for i in part] for part in rows]


def _to_dataset(train: list[Example]) -> datasets.Dataset:
    """The partitionable columns plus a ``row`` column pointing back into ``train``.

    The text stays out: partitioners only read the ``partition_by`` column, and carrying
    tens of megabytes of prompts through Arrow made partitioning several times slower.
    The answer column is made non-null ("" for none) because partitioners sort its values.
    """
    return datasets.Dataset.from_dict(
        {
            "task": [ex.task for ex in train],
            "answer": [ex.answer or "" for ex in train],
            _ROW: list(range(len(train))),
        }
    )


def _check_column(column: str) -> str:
    if column not in PARTITION_COLUMNS:
        raise DataError(
            f"data.partition_by: unknown column {column!r} "
            f"(allowed: {', '.join(PARTITION_COLUMNS)})"
        )
    return column


def _key(ex: Example, column: str) -> str:
    return getattr(ex, column) or ""


def describe_partitions(parts: list[list[Example]], top: int = 3) -> list[dict[str, Any]]:
    """One row per client for ``fedbits data``: size, number of distinct tasks, and its
    ``top`` largest tasks by name (with ``natural`` partitions a client *is* a task)."""
    rows = []
    for i, part in enumerate(parts):
        counts = Counter(ex.task or "(no task)" for ex in part)
        largest = ", ".join(f"{task} ({n})" for task, n in counts.most_common(top))
        more = f", +{len(counts) - top} more" if len(counts) > top else ""
        rows.append({"client": i, "size": len(part), "tasks": len(counts),
                     "largest": largest + more})
    return rows
