"""Number formatting shared by the Markdown report, the comparison table and plot ticks.

One place decides how a byte count or a metric reads, so the same run shows the same
figures in ``report.md``, in ``fedbits compare`` and on the plot axes.
"""

from __future__ import annotations

MISSING = "-"
"""Shown where a value was not recorded (no eval that round, no train loss at round 0)."""

_UNITS = ("KB", "MB", "GB", "TB", "PB")


def format_bytes(n: float, digits: int = 1) -> str:
    """``17600 -> "17.6 KB"``, using decimal units: 1 KB = 1000 B, 1 MB = 1000 KB.

    Decimal, not binary (KiB), because link bandwidths are quoted in powers of ten, so
    a reader can divide the figure by a link speed directly. Counts under 1000 are whole
    bytes; larger ones get ``digits`` decimals (more only where one would make close plot
    ticks read the same). Accepts floats because means per client are not whole numbers.
    """
    if n < 0:
        raise ValueError(f"a byte count cannot be negative: {n}")
    if round(n) < 1000:
        return f"{round(n)} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1000
        if round(value, digits) < 1000 or unit == _UNITS[-1]:
            break
    return f"{value:.{digits}f} {unit}"


def format_exact_bytes(n: int) -> str:
    """``78000 -> "78.0 KB (78,000 B)"``: readable, plus the exact count to check against."""
    return f"{format_bytes(n)} ({n:,} B)"


def format_optional_bytes(n: float | None) -> str:
    """:func:`format_bytes`, or :data:`MISSING` when there was nothing to count (no ledger)."""
    return MISSING if n is None else format_bytes(n)


def format_value(x: float | None, digits: int = 4) -> str:
    """A metric or loss with fixed decimals, or :data:`MISSING` when not recorded."""
    return MISSING if x is None else f"{x:.{digits}f}"


PERCENT_METRICS = frozenset({"rougeL", "exact_match"})
"""Metrics :mod:`fedbits.eval` stores as percentages (0-100, see ``fedbits.eval.metrics``):
they are shown with a ``%`` unit and their plot axes are clamped to [0, 100]."""

_METRIC_NAMES = {
    "eval_loss": "eval loss",
    "perplexity": "perplexity",
    "rougeL": "ROUGE-L",
    "exact_match": "exact match",
}


def metric_name(metric: str) -> str:
    """``"exact_match" -> "exact match"``: the readable name tables and plots show."""
    return _METRIC_NAMES.get(metric, metric)


def metric_axis_label(metric: str) -> str:
    """The name with its unit when it has one (``"exact match (%)"``), for a plot axis."""
    return f"{metric_name(metric)} (%)" if metric in PERCENT_METRICS else metric_name(metric)


def format_metric(metric: str, x: float | None) -> str:
    """``12.5 -> "12.50 %"`` for a percentage metric, ``2.2 -> "2.2000"`` for a loss.

    Percentages carry their unit so ``0.00 %`` cannot be read as a fraction; two decimals
    match the run log and tell apart scores over a few dozen examples (1/64 = 1.56 %).
    """
    if x is None or metric not in PERCENT_METRICS:
        return format_value(x)
    return f"{x:.2f} %"


def format_metric_change(metric: str, delta: float) -> str:
    """A signed change: percentage metrics in percentage points (``"+12.50 pp"``), since
    ``%`` would read as a relative change; losses as plain figures (``"-0.3000"``)."""
    return f"{delta:+.2f} pp" if metric in PERCENT_METRICS else f"{delta:+.4f}"
