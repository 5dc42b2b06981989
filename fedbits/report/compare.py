"""Several runs side by side: what each cost on the wire and where its quality ended.

Methods are compared at the question fedbits exists to answer -- how much quality per
byte -- so the table puts total and per-client bytes next to base and final metrics,
and the plot puts every run on the same log-byte axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedbits.errors import FedbitsError
from fedbits.report.fmt import MISSING, format_bytes, format_optional_bytes, format_value
from fedbits.report.plots import plot_compare
from fedbits.report.run import Run, load_run

COMPARE_METRICS = ("eval_loss", "rougeL", "exact_match")
"""Metrics compared across runs; perplexity is left out because it is exp(eval_loss)."""


def compare_runs(run_dirs: Sequence[str | Path], out: Path | None = None) -> tuple[str, Path]:
    """Tabulate runs (one row each, in the order given) and plot them together.

    Writes the PNG to ``out`` (default ``compare.png`` in the current directory) and
    returns ``(table text, png path)``.
    """
    if not run_dirs:
        raise FedbitsError("compare: no run directories given")
    runs = [load_run(d) for d in run_dirs]
    metrics = [m for m in COMPARE_METRICS if any(m in run.metrics(COMPARE_METRICS) for run in runs)]
    png = plot_compare(runs, metrics, Path("compare.png") if out is None else Path(out))
    return _comparison_table(runs, metrics), png


def _comparison_table(runs: Sequence[Run], metrics: Sequence[str]) -> str:
    header = ["run", "method", "rounds", "bytes up", "bytes down", "up/client/round",
              "down/client/round"]
    for metric in metrics:
        header += [f"{metric} base", f"{metric} final"]
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
            cells += [format_value(series[0][2]), format_value(series[-1][2])]
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
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
