"""Number formatting shared by the Markdown report, the comparison table and plot ticks.

One place decides how a byte count or a metric reads, so the same run shows the same
figures in ``report.md``, in ``fedbits compare`` and on the plot axes.
"""

from __future__ import annotations

MISSING = "-"
"""Shown where a value was not recorded (no eval that round, no train loss at round 0)."""

_UNITS = ("KB", "MB", "GB", "TB", "PB")


def format_bytes(n: float) -> str:
    """``17600 -> "17.6 KB"``, using decimal units: 1 KB = 1000 B, 1 MB = 1000 KB.

    Decimal, not binary (KiB), because link bandwidths are quoted in powers of ten, so
    a reader can divide the figure by a link speed directly. Counts under 1000 are whole
    bytes; larger ones get one decimal. Accepts floats because means per client are not
    whole numbers.
    """
    if n < 0:
        raise ValueError(f"a byte count cannot be negative: {n}")
    if round(n) < 1000:
        return f"{round(n)} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1000
        if round(value, 1) < 1000 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def format_exact_bytes(n: int) -> str:
    """``78000 -> "78.0 KB (78,000 B)"``: readable, plus the exact count to check against."""
    return f"{format_bytes(n)} ({n:,} B)"


def format_optional_bytes(n: float | None) -> str:
    """:func:`format_bytes`, or :data:`MISSING` when there was nothing to count (no ledger)."""
    return MISSING if n is None else format_bytes(n)


def format_value(x: float | None, digits: int = 4) -> str:
    """A metric or loss with fixed decimals, or :data:`MISSING` when not recorded."""
    return MISSING if x is None else f"{x:.{digits}f}"
