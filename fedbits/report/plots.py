"""PNG plots of quality against rounds and against bytes on the wire.

Figures are built on the Agg canvas directly (no pyplot), so plotting never needs a
display, never touches matplotlib's global backend and is safe to call from tests or
a headless server.

Round 0 is the base model evaluated before any byte was sent, so it has no place on a
log byte axis. Every bytes plot therefore draws rounds >= 1 as points and the round-0
value as a dashed horizontal line: the reader sees at once how far training moved the
metric from where it started.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from fedbits.report.fmt import format_bytes
from fedbits.report.run import Run

_DPI = 110
_BASE_LINE = {"linestyle": "--", "linewidth": 1.0, "alpha": 0.7}


def plot_metric_vs_round(run: Run, path: Path) -> Path:
    """One subplot per eval metric the run recorded, metric against round."""
    metrics = run.metrics()
    fig, axes = _metric_figure(metrics, f"{run.name} ({run.method}): eval metrics by round")
    for ax, metric in zip(axes, metrics):
        rounds, _, values = zip(*run.series(metric))
        ax.plot(rounds, values, marker="o")
        ax.set_ylabel(metric)
    if metrics:
        axes[-1].set_xlabel("round")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def plot_metric_vs_bytes(run: Run, path: Path) -> Path:
    """One subplot per eval metric, against cumulative bytes; log x over more than a decade."""
    metrics = run.metrics()
    fig, axes = _metric_figure(metrics, f"{run.name} ({run.method}): eval metrics by bytes sent")
    xs: list[int] = []
    for ax, metric in zip(axes, metrics):
        xs += _plot_series_vs_bytes(ax, run, metric, "C0", "rounds >= 1", "round 0 (base)")
        ax.set_ylabel(metric)
    if metrics:
        _finish_bytes_figure(fig, axes, xs, log=_spans_decade(xs))
    return _save(fig, path)


def plot_compare(runs: Sequence[Run], metrics: Sequence[str], path: Path) -> Path:
    """All runs on shared axes: one subplot per metric, quality against log cumulative bytes."""
    fig, axes = _metric_figure(metrics, "quality vs bytes (dashed: each run's round-0 base)")
    xs: list[int] = []
    for ax, metric in zip(axes, metrics):
        for i, run in enumerate(runs):
            if metric in run.metrics():
                label = f"{run.name} ({run.method})"
                xs += _plot_series_vs_bytes(ax, run, metric, f"C{i % 10}", label, None)
        ax.set_ylabel(metric)
    if metrics:
        _finish_bytes_figure(fig, axes, xs, log=bool(xs))
    return _save(fig, path)


def _metric_figure(metrics: Sequence[str], title: str) -> tuple[Figure, list[Axes]]:
    """A column of gridded subplots sharing x, one per metric; with no metrics, one panel
    saying so, so a plot file always exists for the report to link."""
    fig = Figure(figsize=(7.0, 1.0 + 2.6 * max(len(metrics), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    if not metrics:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no eval metrics recorded", ha="center", va="center")
        ax.set_axis_off()
        return fig, []
    axes = list(fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0])
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _plot_series_vs_bytes(
    ax: Axes, run: Run, metric: str, color: str, label: str, base_label: str | None
) -> list[int]:
    """Rounds with bytes sent as points, the zero-byte base round as a dashed line in the
    same colour (``base_label`` None keeps it out of a legend shared by several runs).

    Returns the x values plotted, so the caller can choose the axis scale.
    """
    series = run.series(metric)
    trained = [(x, v) for _, x, v in series if x > 0]
    base = [v for _, x, v in series if x == 0]
    if trained:
        xs, values = zip(*trained)
        ax.plot(xs, values, marker="o", color=color, label=label)
    if base:
        ax.axhline(base[-1], color=color, label=base_label, **_BASE_LINE)
    return [x for x, _ in trained]


def _spans_decade(xs: Sequence[int]) -> bool:
    return bool(xs) and max(xs) > 10 * min(xs)


def _finish_bytes_figure(fig: Figure, axes: Sequence[Axes], xs: Sequence[int], log: bool) -> None:
    """Byte tick labels ("10.0 KB") on the shared x axis and one legend for the figure.

    On a log axis spanning a couple of decades or less, major ticks go at 1-2-5 so every
    subplot still has labelled ticks; wider spans keep one tick per decade (or fewer).
    """
    bottom = axes[-1]
    if log:
        bottom.set_xscale("log")
        if max(xs) <= 100 * min(xs):
            bottom.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        bottom.xaxis.set_minor_formatter(NullFormatter())
    bottom.xaxis.set_major_formatter(FuncFormatter(_byte_tick))
    bottom.set_xlabel("cumulative bytes (up + down)")
    _figure_legend(fig, axes)


def _figure_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend below the plots, listing each label once, whichever subplot drew it."""
    entries: dict[str, Artist] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(
        list(entries.values()), list(entries.keys()),
        loc="outside lower center", fontsize="small", ncols=2,
    )


def _byte_tick(x: float, _pos: int | None) -> str:
    return format_bytes(x) if math.isfinite(x) and x >= 0 else ""


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path
