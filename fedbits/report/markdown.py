"""``report.md`` for one run: what ran, what each round cost in bytes, what it bought.

The report puts the byte figures and the quality figures side by side, round by round,
because the point of fedbits is the trade between them; the two PNGs it links show the
same trade at a glance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedbits.report.fmt import (
    MISSING,
    format_bytes,
    format_exact_bytes,
    format_metric,
    format_metric_change,
    format_optional_bytes,
    format_value,
    metric_name,
)
from fedbits.report.plots import plot_metric_vs_bytes, plot_metric_vs_round
from fedbits.report.run import Run, config_value, load_run

ROUND_PLOT = "metric_vs_round.png"
BYTES_PLOT = "metric_vs_bytes.png"


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its two PNG plots into ``run_dir``; return the report path."""
    run = load_run(run_dir)
    plot_metric_vs_round(run, run.run_dir / ROUND_PLOT)
    plot_metric_vs_bytes(run, run.run_dir / BYTES_PLOT)
    sections = [
        _summary(run),
        _rounds_table(run),
        _rejections(run),
        *([_faults(run)] if run.has_faults() else []),
        _client_bytes_table(run),
        _metric_change(run),
        _totals(run),
        _plots(),
    ]
    path = run.run_dir / "report.md"
    path.write_text("\n".join(line for section in sections for line in [*section, ""]))
    return path


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table, numbers right-aligned past the first column."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    return [_md_row(header), _md_row(align), *(_md_row(row) for row in rows)]


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _summary(run: Run) -> list[str]:
    num_clients = config_value(run.config, "data", "num_clients")
    of_clients = f" of {num_clients}" if num_clients is not None else ""
    return [
        f"# fedbits run: {run.name}",
        "",
        f"- **Method:** {run.method}",
        f"- **Model:** {run.model}",
        f"- **Data source:** {config_value(run.config, 'data', 'source') or MISSING}",
        f"- **Rounds:** {run.last_round}",
        f"- **Clients per round:** {_clients_per_round(run)}{of_clients}",
        *_fault_summary(run),
        *_accepted_summary(run),
    ]


def _accepted_summary(run: Run) -> list[str]:
    """How many client updates were aggregated, and a warning that cannot be missed when
    none ever was: every figure after round 0 then describes the untrained base model."""
    accepted, sampled = run.accepted_updates()
    if not sampled:
        return []
    line = f"- **Updates accepted:** {accepted} of {sampled}"
    if accepted:
        return [line]
    return [line, "", "> **No update was ever accepted**: every client update was rejected "
            "(see *Rejected updates*), so the model never changed from the base model."]


def _clients_per_round(run: Run) -> str:
    """The observed count over training rounds ("3", or "2-3 (mean 2.7)" when it varied)."""
    counts = [len(row.get("clients", [])) for row in run.rows if row["round"] > 0]
    if not counts:
        return MISSING
    if min(counts) == max(counts):
        return str(counts[0])
    return f"{min(counts)}-{max(counts)} (mean {sum(counts) / len(counts):.1f})"


def _rounds_table(run: Run) -> list[str]:
    metrics = run.metrics()
    header = ["round", "clients", "rejected", "bytes up", "bytes down", "cumulative",
              "train loss", *map(metric_name, metrics), "seconds", "peak RSS MB"]
    rows = [_round_cells(row, metrics) for row in run.rows]
    return ["## Per round", "", *_md_table(header, rows)]


def _round_cells(row: dict[str, Any], metrics: Sequence[str]) -> list[str]:
    return [
        str(row["round"]),
        str(len(row.get("clients", []))),
        str(len(row.get("rejected", {}))),
        format_bytes(row.get("bytes_up") or 0),
        format_bytes(row.get("bytes_down") or 0),
        format_bytes(row.get("cum_bytes") or 0),
        format_value(row.get("train_loss")),
        *(format_metric(m, row.get(m)) for m in metrics),
        format_value(row.get("seconds"), digits=1),
        format_value(row.get("peak_rss_mb"), digits=0),
    ]


def _rejections(run: Run) -> list[str]:
    """One row per rejection reason with where it struck, so a reader tells one flaky
    client from a systematic failure (a codec mismatch rejects every client, every round)."""
    title = ["## Rejected updates", ""]
    by_reason = run.rejections()
    if not by_reason:
        return [*title, "No update was rejected."]
    rows = [
        [_md_cell(reason), str(len(hits)), _number_ranges(r for r, _ in hits),
         _number_ranges(c for _, c in hits)]
        for reason, hits in sorted(by_reason.items(), key=lambda item: -len(item[1]))
    ]
    table = _md_table(["reason", "updates", "rounds", "clients"], rows)
    lost = run.rounds_without_update()
    if not lost:
        return [*title, *table]
    return [*title, *table, "",
            f"Rounds with no accepted update (model unchanged): {_number_ranges(lost)}"]


def _md_cell(text: str) -> str:
    """Free text (an error message) made safe for one table cell: no pipes, one line."""
    return " ".join(text.split()).replace("|", "\\|")


def _number_ranges(numbers: Iterable[int]) -> str:
    """``[5, 1, 2, 3, 3] -> "1-3, 5"``: distinct values, runs collapsed, so a reason that hit
    every round of a long run stays one short cell."""
    values = sorted(set(numbers))
    spans: list[list[int]] = []
    for n in values:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


_FAULT_NAMES = {"dropped": "dropped out", "late": "missed the deadline", "crashed": "crashed"}


def _rejected(run: Run) -> set[tuple[int, int]]:
    """Every (round, client) whose update the run rejected."""
    return {hit for hits in run.rejections().values() for hit in hits}


def _fault_summary(run: Run) -> list[str]:
    """The summary's line on injected faults ([faults]): a run that injects them exists to
    measure a defence, so it says how many attacked updates were rejected."""
    if not run.has_faults():
        return []
    faults = run.injected_faults()
    rejected = _rejected(run)
    parts = [f"{len(faults[k])} {name}" for k, name in _FAULT_NAMES.items() if k in faults]
    attacked = [hit for kind, hits in faults.items() if kind.startswith("attack") for hit in hits]
    if attacked:
        parts.append(f"{len(attacked)} attacked ({sum(h in rejected for h in attacked)} "
                     "of them rejected)")
    return [f"- **Faults injected:** {', '.join(parts) or 'none struck'}"]


def _faults(run: Run) -> list[str]:
    """Each injected fault: how often it struck, where, and how many of the updates it
    touched were rejected. Clients that dropped out, missed the deadline or crashed sent
    nothing, so they are all rejected (and listed under *Rejected updates* with why)."""
    title = ["## Injected faults", ""]
    faults = run.injected_faults()
    if not faults:
        return [*title, "The run injects faults (`[faults]`), but none struck."]
    rejected = _rejected(run)
    rows = [
        [_FAULT_NAMES.get(kind, kind), str(len(hits)), str(sum(h in rejected for h in hits)),
         _number_ranges(r for r, _ in hits), _number_ranges(c for _, c in hits)]
        for kind, hits in faults.items()
    ]
    table = _md_table(["fault", "updates", "rejected", "rounds", "clients"], rows)
    slow = [s for row in run.rows for s in (row.get("faults") or {}).get("slow", {}).values()]
    seconds = sum(float((row.get("faults") or {}).get("simulated_seconds", 0.0))
                  for row in run.rows)
    time_line = f"Simulated time: {seconds:.1f} s over the rounds"
    if slow:
        time_line += f"; {len(slow)} slow clients, {sum(slow) / len(slow):.1f} s on average"
    return [*title, *table, "", time_line + "."]


def _client_bytes_table(run: Run) -> list[str]:
    """Mean bytes per client that sent/received a message, per round, from the ledger."""
    up, down = run.bytes_by_client("up"), run.bytes_by_client("down")
    rows = [
        [str(r), *_client_cells(up.get(r, {})), *_client_cells(down.get(r, {}))]
        for r in sorted(up.keys() | down.keys())
    ]
    title = ["## Bytes per participating client", ""]
    if not rows:
        return [*title, "No ledger.jsonl messages recorded."]
    header = ["round", "clients up", "mean up", "clients down", "mean down"]
    return [*title, *_md_table(header, rows)]


def _client_cells(per_client: dict[int, int]) -> list[str]:
    """How many clients moved bytes that way in the round, and their mean."""
    mean = sum(per_client.values()) / len(per_client) if per_client else None
    return [str(len(per_client)), format_optional_bytes(mean)]


def _metric_change(run: Run) -> list[str]:
    rows = []
    for metric in run.metrics():
        series = run.series(metric)
        (r0, _, first), (r1, _, last) = series[0], series[-1]
        first_cell = f"{format_metric(metric, first)} (round {r0})"
        last_cell = f"{format_metric(metric, last)} (round {r1})"
        rows.append([metric_name(metric), first_cell, last_cell,
                     format_metric_change(metric, last - first)])
    title = ["## Eval metrics: first vs last", ""]
    if not rows:
        return [*title, "No eval metrics recorded."]
    return [*title, *_md_table(["metric", "first", "last", "change"], rows)]


def _totals(run: Run) -> list[str]:
    up, down = run.total_bytes("up"), run.total_bytes("down")
    mean_up = format_optional_bytes(run.mean_client_bytes("up"))
    mean_down = format_optional_bytes(run.mean_client_bytes("down"))
    seconds = sum(float(row.get("seconds") or 0.0) for row in run.rows)
    peaks = [float(row["peak_rss_mb"]) for row in run.rows if row.get("peak_rss_mb") is not None]
    peak = max(peaks, default=None)
    return [
        "## Totals",
        "",
        f"- **Bytes up:** {format_exact_bytes(up)}",
        f"- **Bytes down:** {format_exact_bytes(down)}",
        f"- **Bytes up + down:** {format_exact_bytes(up + down)}",
        f"- **Mean per client per round:** up {mean_up}, down {mean_down}",
        f"- **Wall time:** {seconds:.1f} s",
        f"- **Peak RSS:** {format_value(peak, digits=0)} MB",
    ]


def _plots() -> list[str]:
    return [
        "## Plots",
        "",
        f"![eval metrics by round]({ROUND_PLOT})",
        "",
        f"![eval metrics by cumulative bytes]({BYTES_PLOT})",
    ]
