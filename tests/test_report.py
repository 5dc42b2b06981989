"""Reports and comparisons on synthetic run directories, so they run in well under a second
per test without a model: the figures in them are known exactly and can be asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from fedbits.errors import FedbitsError
from fedbits.report import compare_runs, format_bytes, load_run, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(
    root: Path, name: str, method: str, rows: list[dict[str, Any]], ledger: list[dict[str, Any]]
) -> Path:
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(
        f'[run]\nname = "{name}"\nseed = 0\nrounds = {rows[-1]["round"]}\n\n'
        f'[model]\nname = "tiny-test"\n\n'
        f'[data]\nsource = "builtin:tasks"\nnum_clients = 4\n\n'
        f'[method]\nname = "{method}"\n'
    )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "ledger.jsonl").write_text("".join(json.dumps(m) + "\n" for m in ledger))
    return run_dir


def _round(
    rnd: int, up: dict[int, int], down: dict[int, int], cum: int, **metrics: float
) -> dict[str, Any]:
    """A metrics row as the runtime writes it; train loss only once training has happened."""
    return {
        "round": rnd,
        "clients": sorted(up),
        "rejected": {},
        "bytes_up": sum(up.values()),
        "bytes_down": sum(down.values()),
        "bytes_up_per_client": {str(c): b for c, b in up.items()},
        "bytes_down_per_client": {str(c): b for c, b in down.items()},
        "cum_bytes": cum,
        "train_loss": 2.0 / rnd if rnd else None,
        "seconds": 1.5,
        "peak_rss_mb": 500.0 + rnd,
        **metrics,
    }


def _messages(rnd: int, up: dict[int, int], down: dict[int, int]) -> list[dict[str, Any]]:
    """The ledger rows of one round: each client's download, then each client's upload."""
    return [
        {"round": rnd, "client": c, "direction": direction, "bytes": b}
        for direction, per_client in (("down", down), ("up", up))
        for c, b in per_client.items()
    ]


@pytest.fixture
def alpha(tmp_path: Path) -> Path:
    """fedit, 3 rounds of 2 clients; round 2 was run twice (resume), the first attempt stale.

    Per round: up 2,000 + 4,000 B, down 10,000 B each, so 26,000 B per round.
    Totals: up 18,000 B, down 60,000 B, up+down 78,000 B; per client 3.0 KB up, 10.0 KB down.
    """
    up, down = {0: 2_000, 1: 4_000}, {0: 10_000, 1: 10_000}
    stale_up, stale_down = {0: 111, 1: 111}, {0: 999, 1: 999}
    rows = [
        _round(0, {}, {}, 0, eval_loss=3.0, perplexity=math.exp(3.0), exact_match=0.1),
        _round(1, up, down, 26_000, eval_loss=2.5, perplexity=math.exp(2.5), exact_match=0.2),
        _round(2, stale_up, stale_down, 99_999, eval_loss=9.99, exact_match=0.0),
        _round(2, up, down, 52_000, eval_loss=2.2, perplexity=math.exp(2.2), exact_match=0.3),
        _round(3, up, down, 78_000, eval_loss=2.0, perplexity=math.exp(2.0), exact_match=0.4),
    ]
    ledger = [*_messages(1, up, down), *_messages(2, stale_up, stale_down), *_messages(2, up, down),
              *_messages(3, up, down)]
    return _write_run(tmp_path, "alpha", "fedit", rows, ledger)


@pytest.fixture
def beta(tmp_path: Path) -> Path:
    """A cheap method over 2 rounds of 3 clients: 150 B up and 900 B down per round; has
    rougeL (alpha has not) and no exact_match."""
    up, down = {0: 50, 1: 50, 2: 50}, {0: 300, 1: 300, 2: 300}
    rows = [
        _round(0, {}, {}, 0, eval_loss=3.0, rougeL=0.10),
        _round(1, up, down, 1_050, eval_loss=2.9, rougeL=0.15),
        _round(2, up, down, 2_100, eval_loss=2.8, rougeL=0.20),
    ]
    ledger = [*_messages(1, up, down), *_messages(2, up, down)]
    return _write_run(tmp_path, "beta", "sparse", rows, ledger)


def _assert_matplotlib_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000
    assert b"Matplotlib" in data  # the Software text chunk matplotlib writes
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # something was drawn, not a blank canvas


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (17_600, "17.6 KB"), (999_960, "1.0 MB"),
     (2_500_000, "2.5 MB"), (3.3e9, "3.3 GB"), (1499.5, "1.5 KB")],
)
def test_format_bytes_uses_decimal_units(n: float, text: str) -> None:
    assert format_bytes(n) == text


def test_format_bytes_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_bytes(-1)


def test_load_run_keeps_last_occurrence_of_a_round(alpha: Path) -> None:
    run = load_run(alpha)
    assert (run.name, run.method, run.model) == ("alpha", "fedit", "tiny-test")
    assert [row["round"] for row in run.rows] == [0, 1, 2, 3]
    assert run.rows[2]["eval_loss"] == 2.2
    assert run.total_bytes("up") == 18_000 and run.total_bytes("down") == 60_000
    assert run.bytes_by_client("up")[2] == {0: 2_000, 1: 4_000}
    assert run.mean_client_bytes("up") == 3_000 and run.mean_client_bytes("down") == 10_000


def test_report_has_the_numbers(alpha: Path) -> None:
    path = write_report(alpha)
    assert path == alpha / "report.md"
    text = path.read_text()
    assert "**Method:** fedit" in text and "**Model:** tiny-test" in text
    assert "**Data source:** builtin:tasks" in text
    assert "**Rounds:** 3" in text and "**Clients per round:** 2 of 4" in text
    assert "**Bytes up:** 18.0 KB (18,000 B)" in text
    assert "**Bytes down:** 60.0 KB (60,000 B)" in text
    assert "**Bytes up + down:** 78.0 KB (78,000 B)" in text
    assert "**Mean per client per round:** up 3.0 KB, down 10.0 KB" in text
    assert "| 2 | 2 | 0 | 6.0 KB | 20.0 KB | 52.0 KB | 1.0000 | 2.2000 |" in text
    assert "9.99" not in text and "222 B" not in text  # the stale attempt of round 2
    assert "| 2 | 2 | 3.0 KB | 2 | 10.0 KB |" in text  # per-client means from the ledger
    assert "| eval_loss | 3.0000 (round 0) | 2.0000 (round 3) | -1.0000 |" in text
    assert "| exact_match | 0.1000 (round 0) | 0.4000 (round 3) | +0.3000 |" in text
    assert "](metric_vs_round.png)" in text and "](metric_vs_bytes.png)" in text


def test_report_writes_plots(alpha: Path) -> None:
    write_report(alpha)
    for name in ("metric_vs_round.png", "metric_vs_bytes.png"):
        _assert_matplotlib_png(alpha / name)


def test_report_without_eval_metrics_or_ledger(tmp_path: Path) -> None:
    rows = [_round(0, {}, {}, 0), _round(1, {0: 10}, {0: 20}, 30)]
    run_dir = _write_run(tmp_path, "bare", "fedit", rows, [])
    (run_dir / "ledger.jsonl").unlink()
    text = write_report(run_dir).read_text()
    assert "No eval metrics recorded." in text and "No ledger.jsonl messages recorded." in text
    assert "**Mean per client per round:** up -, down -" in text
    _assert_matplotlib_png(run_dir / "metric_vs_bytes.png")


def test_compare_rows_follow_argument_order(alpha: Path, beta: Path, tmp_path: Path) -> None:
    table, png = compare_runs([beta, alpha], out=tmp_path / "plots" / "cmp.png")
    header, rule, *rows = table.splitlines()
    assert header.split("  ")[0] == "run"
    for column in ("bytes up", "bytes down", "up/client/round", "down/client/round",
                   "eval_loss base", "eval_loss final", "rougeL base", "rougeL final",
                   "exact_match base", "exact_match final"):
        assert column in header
    assert "perplexity" not in header
    assert set(rule.replace(" ", "")) == {"-"}
    assert [r.split() for r in rows] == [
        ["beta", "sparse", "2", "300", "B", "1.8", "KB", "50", "B", "300", "B",
         "3.0000", "2.8000", "0.1000", "0.2000", "-", "-"],
        ["alpha", "fedit", "3", "18.0", "KB", "60.0", "KB", "3.0", "KB", "10.0", "KB",
         "3.0000", "2.0000", "-", "-", "0.1000", "0.4000"],
    ]
    assert png == tmp_path / "plots" / "cmp.png"
    _assert_matplotlib_png(png)


def test_compare_default_png_in_current_dir(
    alpha: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _, png = compare_runs([alpha])
    assert png == Path("compare.png")
    _assert_matplotlib_png(tmp_path / "compare.png")


def test_compare_needs_a_run() -> None:
    with pytest.raises(FedbitsError, match="no run directories"):
        compare_runs([])


def test_missing_metrics_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FedbitsError, match="metrics.jsonl") as err:
        load_run(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FedbitsError, match="run directory not found"):
        write_report(tmp_path / "nope")


def test_malformed_metrics_line_names_file_and_line(alpha: Path) -> None:
    metrics = alpha / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], '{"round": 1, "bytes_up": ', *lines[2:]]) + "\n")
    with pytest.raises(FedbitsError, match="not valid JSON") as err:
        load_run(alpha)
    assert f"{metrics}:2:" in str(err.value)


def test_metrics_row_without_round_is_rejected(alpha: Path) -> None:
    metrics = alpha / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"bytes_up": 3}\n')
    with pytest.raises(FedbitsError, match=r"metrics.jsonl:6: 'round'"):
        load_run(alpha)


def test_metrics_value_must_be_a_number(alpha: Path) -> None:
    metrics = alpha / "metrics.jsonl"
    metrics.write_text('{"round": 0, "eval_loss": "low"}\n')
    with pytest.raises(FedbitsError, match=r"metrics.jsonl:1: 'eval_loss' must be a number"):
        load_run(alpha)


def test_malformed_ledger_line_names_file_and_line(alpha: Path) -> None:
    ledger = alpha / "ledger.jsonl"
    ledger.write_text('{"round": 1, "client": 0, "direction": "sideways", "bytes": 5}\n')
    with pytest.raises(FedbitsError, match=r"ledger.jsonl:1: 'direction'"):
        load_run(alpha)


def test_empty_metrics_file_is_an_error(alpha: Path) -> None:
    (alpha / "metrics.jsonl").write_text("\n")
    with pytest.raises(FedbitsError, match="no rounds recorded"):
        load_run(alpha)
