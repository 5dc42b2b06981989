"""Several runs side by side: what each cost on the wire and where its quality ended.

Methods are compared at the question fedbits exists to answer -- how much quality per
byte -- so the table puts total and per-client bytes next to base and final metrics,
and the plot puts every run on the same byte axis. Quality figures only compare when
the runs scored the same examples, so the table ends with a note when their eval sets
differ.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fedbits.config import DataSection, EvalSection, RunSection
from fedbits.errors import FedbitsError
from fedbits.report.fmt import (
    MISSING,
    format_bytes,
    format_metric,
    format_optional_bytes,
    metric_name,
)
from fedbits.report.plots import plot_compare
from fedbits.report.run import Run, load_run

COMPARE_METRICS = ("eval_loss", "rougeL", "exact_match")
"""Metrics compared across runs; perplexity is left out because it is exp(eval_loss)."""

PLOT_FORMATS = (".png", ".svg", ".pdf")
"""File types ``--out`` may name: matplotlib writes them all without extra software."""

DEFAULT_PLOT_NAME = "compare.png"

_SEPARATORS = tuple(sep for sep in (os.sep, os.altsep) if sep)


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> tuple[str, Path]:
    """Tabulate runs (one row each, in the order given) and plot them together.

    ``out`` is a .png/.svg/.pdf file, or a directory (existing, or named with a trailing
    separator) to get ``compare.png`` in it; by default the plot goes next to the runs
    (see :func:`default_plot_path`). Returns ``(table text, plot path)``; the text ends
    with a note when the runs were evaluated on different examples.
    """
    if not run_dirs:
        raise FedbitsError("compare: no run directories given")
    path = None if out is None else plot_path(out)
    runs = [load_run(d) for d in run_dirs]
    metrics = [m for m in COMPARE_METRICS if any(m in run.metrics(COMPARE_METRICS) for run in runs)]
    png = plot_compare(runs, metrics, path or default_plot_path(runs))
    table = _comparison_table(runs, metrics)
    note = _eval_set_note(runs)
    return (f"{table}\n\n{note}" if note else table), png


def plot_path(out: str | Path) -> Path:
    """Where ``--out`` asks for the plot; a directory gets :data:`DEFAULT_PLOT_NAME` in it.

    The trailing separator is read from the string because :class:`Path` drops it. An
    unsupported suffix is refused here, before any work, rather than by matplotlib later.
    """
    text = str(out)
    path = Path(out)
    if path.is_dir() or text.endswith(_SEPARATORS):
        return path / DEFAULT_PLOT_NAME
    if path.suffix.lower() not in PLOT_FORMATS:
        raise FedbitsError(
            f"compare --out {text}: cannot write a {path.suffix or 'suffix-less'} file; "
            f"name a {', '.join(PLOT_FORMATS[:-1])} or {PLOT_FORMATS[-1]} file, or a directory"
        )
    return path


def default_plot_path(runs: Sequence[Run]) -> Path:
    """``<dir>/compare.png`` for the directory holding the runs (``runs/`` for ``runs/*``),
    or the first run's when they live in different places: next to what it describes,
    not wherever the command happened to be started."""
    parents = {run.run_dir.absolute().parent for run in runs}
    parent = parents.pop() if len(parents) == 1 else runs[0].run_dir.absolute().parent
    return parent / DEFAULT_PLOT_NAME


def eval_set(config: dict[str, Any]) -> dict[str, Any]:
    """The config values that decide which examples a run was scored on, by dotted key.

    Mirrors how a run picks them (``fedbits.runtime.setup.prepare_run`` and
    ``fedbits.data.partition.split_eval``): the source and its cap, or ``eval_source``
    alone; the split and the settings that split reads; the seed every draw uses; and
    how many held-out examples are scored. Keys absent from config.toml take the
    defaults a run would have used.
    """
    data = _with_defaults(config, "data", DataSection)
    used = ["eval_source"]
    if data["eval_source"] is None:
        used += ["source", "max_examples", "eval_split"]
        if data["eval_split"] == "unseen":
            used.append("partition_by")
        held_out_values = data["eval_split"] == "unseen" and data["eval_values"]
        used.append("eval_values" if held_out_values else "eval_fraction")
    if str(data["eval_source"] or data["source"]).startswith("builtin:"):
        used.append("builtin_per_task")  # how many examples a builtin source generates
    spec = {f"data.{key}": data[key] for key in used}
    if "data.eval_values" in spec:  # held out as a set: the order they are listed in is moot
        spec["data.eval_values"] = sorted(spec["data.eval_values"])
    spec["run.seed"] = _with_defaults(config, "run", RunSection)["seed"]
    spec["eval.max_examples"] = _with_defaults(config, "eval", EvalSection)["max_examples"]
    return spec


def _with_defaults(config: dict[str, Any], section: str, model: type[BaseModel]) -> dict[str, Any]:
    """One config.toml table over the defaults of its section model."""
    table = config.get(section)
    return {**model().model_dump(), **(table if isinstance(table, dict) else {})}


def eval_set_differences(runs: Sequence[Run]) -> list[str]:
    """``"run.seed: a 0, b 1"`` for each eval-set setting the runs disagree on (``-``:
    the setting does not apply to that run). Empty when all scored the same examples."""
    specs = [eval_set(run.config) for run in runs]
    keys = list(dict.fromkeys(key for spec in specs for key in spec))
    named = list(zip([run.name for run in runs], specs, strict=True))
    return [
        f"{key}: " + ", ".join(f"{name} {_setting(spec, key)}" for name, spec in named)
        for key in keys
        if len({_setting(spec, key) for spec in specs}) > 1
    ]


def _setting(spec: dict[str, Any], key: str) -> str:
    return repr(spec[key]) if key in spec else MISSING


def _eval_set_note(runs: Sequence[Run]) -> str:
    """Why the quality columns may not compare: eval sets that differ, or cannot be checked
    (a run without config.toml is left out of the check rather than assumed default)."""
    lines = []
    diffs = eval_set_differences([run for run in runs if run.config])
    if diffs:
        lines += ["warning: these runs were scored on different eval sets, so their quality "
                  "columns do not compare:", *(f"  {diff}" for diff in diffs)]
    unknown = [run.name for run in runs if not run.config]
    if unknown and len(runs) > 1:
        lines.append(f"warning: no config.toml, so the eval set is unknown: {', '.join(unknown)}")
    return "\n".join(lines)


def _comparison_table(runs: Sequence[Run], metrics: Sequence[str]) -> str:
    header = ["run", "method", "rounds", "bytes up", "bytes down", "up/client/round",
              "down/client/round"]
    for metric in metrics:
        header += [f"{metric_name(metric)} base", f"{metric_name(metric)} final"]
    return _text_table(header, [_run_cells(run, metrics) for run in runs])


def _run_cells(run: Run, metrics: Sequence[str]) -> list[str]:
    """Base is the first evaluated value (round 0, the untrained model, when it was
    evaluated there), final the last."""
    cells = [
        run.name,
        run.method,
        str(run.last_round),
        format_bytes(run.total_bytes("up")),
        format_bytes(run.total_bytes("down")),
        format_optional_bytes(run.mean_client_bytes("up")),
        format_optional_bytes(run.mean_client_bytes("down")),
    ]
    for metric in metrics:
        series = run.series(metric)
        if series:
            cells += [format_metric(metric, series[0][2]), format_metric(metric, series[-1][2])]
        else:
            cells += [MISSING, MISSING]
    return cells


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: names left-aligned, figures right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(_text_row(cells, widths) for cells in lines)


def _text_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ).rstrip()
