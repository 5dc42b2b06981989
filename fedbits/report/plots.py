"""PNG plots of quality against rounds and against bytes on the wire.

Figures are built on the Agg canvas directly (no pyplot), so plotting never needs a
display, never touches matplotlib's global backend and is safe to call from tests or
a headless server.

Round 0 is the base model evaluated before any byte was sent, so it has no place on a
log byte axis. Every bytes plot therefore draws rounds >= 1 as points and the round-0
value as a dashed horizontal line: the reader sees at once how far training moved the
metric from where it started.

Each plot has a ``*_figure`` builder returning the :class:`Figure`, so tests can check
what is drawn (tick labels, axis limits), and a ``plot_*`` wrapper that saves it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, LogLocator, MaxNLocator, NullFormatter

from fedbits.report.fmt import PERCENT_METRICS, format_bytes, metric_axis_label
from fedbits.report.run import Run


class _LineStyle(TypedDict):
    linestyle: str
    linewidth: float
    alpha: float


_DPI = 110
_BASE_LINE: _LineStyle = {"linestyle": "--", "linewidth": 1.0, "alpha": 0.7}
_MAX_BYTE_TICKS = 7
"""Byte tick labels at most: "100.0 KB" is wide, and seven fit a 7-inch axis with room."""
_MIN_PERCENT_SPAN = 1.0
"""Smallest y range of a percentage axis, in points, so a flat 0 % reads as 0 of 1 %."""


def plot_metric_vs_round(run: Run, path: Path) -> Path:
    """Save :func:`metric_vs_round_figure` to ``path``."""
    return _save(metric_vs_round_figure(run), path)


def plot_metric_vs_bytes(run: Run, path: Path) -> Path:
    """Save :func:`metric_vs_bytes_figure` to ``path``."""
    return _save(metric_vs_bytes_figure(run), path)


def plot_compare(runs: Sequence[Run], metrics: Sequence[str], path: Path) -> Path:
    """Save :func:`compare_figure` to ``path`` (its suffix picks the format)."""
    return _save(compare_figure(runs, metrics), path)


def metric_vs_round_figure(run: Run) -> Figure:
    """One subplot per eval metric the run recorded, metric against round."""
    metrics = run.metrics()
    fig, axes = _metric_figure(metrics, f"{run.name} ({run.method}): eval metrics by round")
    for ax, metric in zip(axes, metrics, strict=True):
        rounds, _, values = zip(*run.series(metric), strict=True)
        ax.plot(rounds, values, marker="o", clip_on=False)
        _finish_metric_axis(ax, metric)
    if metrics:
        axes[-1].set_xlabel("round")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def metric_vs_bytes_figure(run: Run) -> Figure:
    """One subplot per eval metric, against cumulative bytes; log x over more than a decade."""
    metrics = run.metrics()
    fig, axes = _metric_figure(metrics, f"{run.name} ({run.method}): eval metrics by bytes sent")
    xs: list[int] = []
    for ax, metric in zip(axes, metrics, strict=True):
        xs += _plot_series_vs_bytes(ax, run, metric, "C0", "rounds >= 1", "round 0 (base)")
        _finish_metric_axis(ax, metric)
    if metrics:
        _finish_bytes_figure(fig, axes, xs)
    return fig


def compare_figure(runs: Sequence[Run], metrics: Sequence[str]) -> Figure:
    """All runs on shared axes: one subplot per metric, quality against cumulative bytes
    (log when the runs span more than a decade, as methods that compress usually do)."""
    fig, axes = _metric_figure(metrics, "quality vs bytes (dashed: each run's round-0 base)")
    xs: list[int] = []
    for ax, metric in zip(axes, metrics, strict=True):
        for i, run in enumerate(runs):
            if metric in run.metrics():
                label = f"{run.name} ({run.method})"
                xs += _plot_series_vs_bytes(ax, run, metric, f"C{i % 10}", label, None)
        _finish_metric_axis(ax, metric)
    if metrics:
        _finish_bytes_figure(fig, axes, xs)
    return fig


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
        xs, values = zip(*trained, strict=True)
        ax.plot(xs, values, marker="o", color=color, label=label, clip_on=False)
    if base:
        ax.axhline(base[-1], color=color, label=base_label, **_BASE_LINE)
    return [x for x, _ in trained]


def _finish_metric_axis(ax: Axes, metric: str) -> None:
    """Label the y axis with the metric's unit and keep it inside the metric's range.

    Every metric is non-negative and percentages stop at 100, but autoscaling pads past
    the data, so a run stuck at 0 % would show a -0.04 tick: clamp at 0 (and 100). A flat
    percentage also gets a span of at least :data:`_MIN_PERCENT_SPAN` points, not
    hundredths of one; markers are drawn unclipped, so points on a clamped edge stay whole.
    """
    ax.set_ylabel(metric_axis_label(metric))
    bottom, top = ax.get_ylim()
    bottom = max(bottom, 0.0)
    if metric in PERCENT_METRICS:
        top = min(max(top, bottom + _MIN_PERCENT_SPAN), 100.0)
    ax.set_ylim(bottom, top)


def _spans_decade(xs: Sequence[int]) -> bool:
    return bool(xs) and max(xs) > 10 * min(xs)


def _finish_bytes_figure(fig: Figure, axes: Sequence[Axes], xs: Sequence[int]) -> None:
    """Byte tick labels ("10.0 KB") on the shared x axis and one legend for the figure.

    At most :data:`_MAX_BYTE_TICKS` labels so they never run into each other: on a linear
    axis at 1-2-5 multiples of whole bytes, which one decimal (two on a narrow axis) shows
    exactly; on a log axis (more than a decade) at 1-2-5 up to two decades, so every
    subplot still has labelled ticks, else at whole decades, skipping some when many.
    """
    bottom = axes[-1]
    if _spans_decade(xs):
        bottom.set_xscale("log")
        subs = (1.0, 2.0, 5.0) if max(xs) <= 100 * min(xs) else (1.0,)
        bottom.xaxis.set_major_locator(LogLocator(subs=subs, numticks=_MAX_BYTE_TICKS))
        bottom.xaxis.set_minor_formatter(NullFormatter())
    else:
        linear = MaxNLocator(_MAX_BYTE_TICKS - 1, steps=[1, 2, 5, 10], integer=True, min_n_ticks=3)
        bottom.xaxis.set_major_locator(linear)
    bottom.xaxis.set_major_formatter(_ByteFormatter())
    bottom.set_xlabel("cumulative bytes (up + down)")
    _figure_legend(fig, axes)


def _figure_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend below the plots, listing each label once, whichever subplot drew it."""
    entries: dict[str, Artist] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(
        list(entries.values()), list(entries.keys()),
        loc="outside lower center", fontsize="small", ncols=2,
    )


class _ByteFormatter(Formatter):
    """Tick labels by :func:`format_bytes`, with a second or third decimal only when one
    would give two ticks the same label (ticks 50 KB apart on an axis in MB)."""

    _digits = 1

    def set_locs(self, locs: Sequence[float]) -> None:
        # matplotlib's stub says list[float]; format_ticks passes the locator's ndarray
        super().set_locs(locs)  # type: ignore[arg-type]
        shown = [x for x in locs if _is_byte_count(x)]
        self._digits = next(
            (d for d in (1, 2) if len({format_bytes(x, d) for x in shown}) == len(shown)), 3
        )

    def __call__(self, x: float, pos: int | None = None) -> str:
        return format_bytes(x, self._digits) if _is_byte_count(x) else ""


def _is_byte_count(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path
