"""Reading a finished (or interrupted) run directory back into memory.

The runtime appends to ``metrics.jsonl`` and ``ledger.jsonl`` as it goes and may be
resumed, so the files can hold a round twice. Everything downstream (report, compare,
plots) reads through :func:`load_run`, which applies the one rule -- the last record
of a round wins -- so no two views of the same run can disagree.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedbits.errors import FedbitsError

EVAL_METRICS = ("eval_loss", "perplexity", "rougeL", "exact_match")
"""The evaluation keys a metrics row may carry, in the order they are shown."""

Direction = Literal["up", "down"]


@dataclass
class Run:
    """One run directory: its config, one metrics row per round and the message ledger.

    ``rows`` are deduplicated by round (last occurrence wins) and sorted by round;
    ``ledger`` is the raw message log in file order (see :meth:`bytes_by_client`).
    """

    name: str
    method: str
    model: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    ledger: list[dict[str, Any]]
    run_dir: Path

    @property
    def last_round(self) -> int:
        """The highest round recorded: the number of training rounds that completed."""
        return self.rows[-1]["round"]

    def metrics(self, candidates: Iterable[str] = EVAL_METRICS) -> list[str]:
        """The eval metrics among ``candidates`` that at least one round recorded."""
        return [m for m in candidates if any(row.get(m) is not None for row in self.rows)]

    def series(self, metric: str) -> list[tuple[int, int, float]]:
        """``(round, cumulative bytes, value)`` for every round that recorded ``metric``."""
        return [
            (row["round"], int(row.get("cum_bytes") or 0), float(row[metric]))
            for row in self.rows
            if row.get(metric) is not None
        ]

    def rejections(self) -> dict[str, list[tuple[int, int]]]:
        """``{reason: [(round, client), ...]}``: every rejected update, grouped by why."""
        out: dict[str, list[tuple[int, int]]] = {}
        for row in self.rows:
            for client, reason in row.get("rejected", {}).items():
                out.setdefault(reason, []).append((row["round"], int(client)))
        return out

    def injected_faults(self) -> dict[str, list[tuple[int, int]]]:
        """``{fault: [(round, client), ...]}``: what the simulator's ``[faults]`` made
        clients do, each attack under its own name (``"attack: nan"``); empty for a run
        without faults. Dropouts, late and crashed clients are rejections too, so they
        also appear in :meth:`rejections`; an attacked update was rejected only if the
        server refused it."""
        out: dict[str, list[tuple[int, int]]] = {}
        for row in self.rows:
            faults = row.get("faults") or {}
            for kind in ("dropped", "late", "crashed"):
                out.setdefault(kind, []).extend((row["round"], c) for c in faults.get(kind, []))
            for client, attack in faults.get("attacked", {}).items():
                out.setdefault(f"attack: {attack}", []).append((row["round"], int(client)))
        return {kind: hits for kind, hits in out.items() if hits}

    def has_faults(self) -> bool:
        """Whether the run injected faults (its config has a ``[faults]`` section)."""
        return any("faults" in row for row in self.rows)

    def accepted_updates(self) -> tuple[int, int]:
        """``(accepted, sampled)`` client updates over the training rounds: every sampled
        client owes one update, and a rejected one is not aggregated."""
        trained = [row for row in self.rows if row["round"] > 0]
        sampled = sum(len(row.get("clients", [])) for row in trained)
        return sampled - sum(len(row.get("rejected", {})) for row in trained), sampled

    def rounds_without_update(self) -> list[int]:
        """Training rounds whose every sampled client was rejected: nothing was aggregated,
        so the global model came out of them unchanged."""
        return [
            row["round"] for row in self.rows
            if row["round"] > 0 and row.get("clients")
            and len(row.get("rejected", {})) == len(row["clients"])
        ]

    def total_bytes(self, direction: Direction) -> int:
        """Bytes sent in one direction over the whole run, summed over the rounds."""
        return sum(int(row.get(f"bytes_{direction}") or 0) for row in self.rows)

    def bytes_by_client(self, direction: Direction) -> dict[int, dict[int, int]]:
        """``{round: {client: bytes}}`` for one direction, from the ledger.

        A client sends one message per direction per round, so a repeated
        ``(round, client, direction)`` is a round replayed after ``--resume``: the later
        row wins, as in metrics.jsonl. Rounds absent from metrics.jsonl (a round cut
        short by a crash and never completed) are left out.
        """
        rounds = {row["round"] for row in self.rows}
        out: dict[int, dict[int, int]] = {}
        for msg in self.ledger:
            if msg["direction"] == direction and msg["round"] in rounds:
                out.setdefault(msg["round"], {})[msg["client"]] = msg["bytes"]
        return out

    def mean_client_bytes(self, direction: Direction) -> float | None:
        """Mean bytes per participating client per round, over all rounds (None: no ledger)."""
        rounds = self.bytes_by_client(direction).values()
        sizes = [b for per_client in rounds for b in per_client.values()]
        return sum(sizes) / len(sizes) if sizes else None


def load_run(run_dir: str | Path) -> Run:
    """Read ``config.toml``, ``metrics.jsonl`` and ``ledger.jsonl`` from ``run_dir``.

    metrics.jsonl is required: without it there is nothing to report. config.toml and
    ledger.jsonl are optional so a partly copied run can still be summarised (name falls
    back to the directory name, per-client means show as missing). Any unreadable file
    or malformed line raises :class:`FedbitsError` naming the file and line.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise FedbitsError(
            f"{run_dir} is a file, not a run directory (expected a directory holding metrics.jsonl)"
        )
    if not run_dir.is_dir():
        raise FedbitsError(f"run directory not found: {run_dir}")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FedbitsError(
            f"{run_dir} holds no metrics.jsonl: not a fedbits run directory, or its run has "
            "not finished round 0 yet"
        )
    by_round = {row["round"]: row for row in _read_jsonl(metrics_path, _check_metrics_row)}
    if not by_round:
        raise FedbitsError(f"{metrics_path}: no rounds recorded")
    ledger_path = run_dir / "ledger.jsonl"
    ledger = _read_jsonl(ledger_path, _check_ledger_row) if ledger_path.is_file() else []
    config = _read_config(run_dir / "config.toml")
    return Run(
        name=_config_str(config, "run", "name", run_dir.name),
        method=_config_str(config, "method", "name", "unknown"),
        model=_config_str(config, "model", "name", "unknown"),
        config=config,
        rows=[by_round[r] for r in sorted(by_round)],
        ledger=ledger,
        run_dir=run_dir,
    )


def config_value(config: dict[str, Any], section: str, key: str) -> Any:
    """``config[section][key]``, or None when the section or key is absent."""
    table = config.get(section)
    return table.get(key) if isinstance(table, dict) else None


def _config_str(config: dict[str, Any], section: str, key: str, default: str) -> str:
    value = config_value(config, section, key)
    return str(value) if value is not None else default


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FedbitsError(f"{path}: not valid TOML: {e}") from None


def _read_jsonl(path: Path, check: Callable[[Any], str | None]) -> list[dict[str, Any]]:
    """Parse one JSON object per line; ``check`` returns why a parsed row is unusable."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FedbitsError(f"{path}: cannot read: {e}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FedbitsError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
        problem = check(row)
        if problem is not None:
            raise FedbitsError(f"{path}:{lineno}: {problem}")
        rows.append(row)
    return rows


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metrics_row(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "expected a JSON object per line"
    if not _is_int(row.get("round")) or row["round"] < 0:
        return f"'round' must be a non-negative integer, got {row.get('round')!r}"
    for key in ("train_loss", *EVAL_METRICS):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key!r} must be a number or null, got {value!r}"
    return _check_rejected(row.get("rejected", {})) or _check_faults(row.get("faults", {}))


def _check_faults(faults: Any) -> str | None:
    """The report counts injected faults by client, so the lists must hold client ids and
    ``attacked`` must map client ids to attack names, as the simulator writes them."""
    ok = isinstance(faults, dict) and all(
        isinstance(faults.get(kind, []), list) and all(_is_int(c) for c in faults.get(kind, []))
        for kind in ("dropped", "late", "crashed")
    ) and _is_id_map(faults.get("attacked", {}), str)
    return None if ok else f"'faults' is not a fault record as the simulator writes it: {faults!r}"


def _is_id_map(value: Any, kind: type) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and k.isdigit() and isinstance(v, kind) for k, v in value.items())


def _check_rejected(rejected: Any) -> str | None:
    """The report groups rejections by reason and lists client ids as numbers, so the
    field must be ``{"<client id>": "<reason>"}`` as the runtime writes it."""
    if not _is_id_map(rejected, str):
        return f"'rejected' must map client ids to reasons, got {rejected!r}"
    return None


def _check_ledger_row(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "expected a JSON object per line"
    for key in ("round", "client", "bytes"):
        if not _is_int(row.get(key)) or row[key] < 0:
            return f"{key!r} must be a non-negative integer, got {row.get(key)!r}"
    if row.get("direction") not in ("up", "down"):
        return f"'direction' must be 'up' or 'down', got {row.get('direction')!r}"
    return None
