"""Reports and comparisons on synthetic run directories, so they run in well under a second
per test without a model: the figures in them are known exactly and can be asserted."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from fedbits.cli import main
from fedbits.errors import FedbitsError
from fedbits.report import compare_runs, format_bytes, load_run, write_report
from fedbits.report.fmt import format_metric
from fedbits.report.plots import compare_figure, metric_vs_bytes_figure, metric_vs_round_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(
    root: Path, name: str, method: str, rows: list[dict[str, Any]], ledger: list[dict[str, Any]],
    seed: int = 0, data: str = "",
) -> Path:
    """``data``: extra ``[data]`` lines of config.toml (``'eval_fraction = 0.2\\n'``)."""
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(
        f'[run]\nname = "{name}"\nseed = {seed}\nrounds = {rows[-1]["round"]}\n\n'
        f'[model]\nname = "tiny-test"\n\n'
        f'[data]\nsource = "builtin:tasks"\nnum_clients = 4\n{data}\n'
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

    Per round: up 2,000 + 4,000 B, down 10,000 B each, so 26,000 B per round. exact_match is
    a percentage, as fedbits.eval stores it.
    Totals: up 18,000 B, down 60,000 B, up+down 78,000 B; per client 3.0 KB up, 10.0 KB down.
    """
    up, down = {0: 2_000, 1: 4_000}, {0: 10_000, 1: 10_000}
    stale_up, stale_down = {0: 111, 1: 111}, {0: 999, 1: 999}
    rows = [
        _round(0, {}, {}, 0, eval_loss=3.0, perplexity=math.exp(3.0), exact_match=10.0),
        _round(1, up, down, 26_000, eval_loss=2.5, perplexity=math.exp(2.5), exact_match=20.0),
        _round(2, stale_up, stale_down, 99_999, eval_loss=9.99, exact_match=0.0),
        _round(2, up, down, 52_000, eval_loss=2.2, perplexity=math.exp(2.2), exact_match=30.0),
        _round(3, up, down, 78_000, eval_loss=2.0, perplexity=math.exp(2.0), exact_match=40.0),
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
        _round(0, {}, {}, 0, eval_loss=3.0, rougeL=10.0),
        _round(1, up, down, 1_050, eval_loss=2.9, rougeL=15.0),
        _round(2, up, down, 2_100, eval_loss=2.8, rougeL=20.0),
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
    assert "| eval loss | 3.0000 (round 0) | 2.0000 (round 3) | -1.0000 |" in text
    assert "| exact match | 10.00 % (round 0) | 40.00 % (round 3) | +30.00 pp |" in text
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
                   "eval loss base", "eval loss final", "ROUGE-L base", "ROUGE-L final",
                   "exact match base", "exact match final"):
        assert column in header
    assert "perplexity" not in header
    assert set(rule.replace(" ", "")) == {"-"}
    assert [r.split() for r in rows] == [
        ["beta", "sparse", "2", "300", "B", "1.8", "KB", "50", "B", "300", "B",
         "3.0000", "2.8000", "10.00", "%", "20.00", "%", "-", "-"],
        ["alpha", "fedit", "3", "18.0", "KB", "60.0", "KB", "3.0", "KB", "10.0", "KB",
         "3.0000", "2.0000", "-", "-", "10.00", "%", "40.00", "%"],
    ]
    assert png == tmp_path / "plots" / "cmp.png"
    _assert_matplotlib_png(png)




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


# -- compare --out and the default plot path ------------------------------------------


@pytest.mark.parametrize("out", ["c.txt", "cmp", "plot.jpg"])
def test_compare_out_refuses_what_it_cannot_write(
    alpha: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str
) -> None:
    path = tmp_path / out
    assert main(["compare", str(alpha), "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line, not matplotlib's
    assert err.startswith("fedbits: error: compare --out") and str(path) in err
    assert ".png" in err and ".svg" in err and ".pdf" in err
    assert not path.exists()


@pytest.mark.parametrize(("name", "magic"), [("c.svg", b"<?xml"), ("c.pdf", b"%PDF"),
                                              ("c.PNG", PNG_SIGNATURE)])
def test_compare_out_other_formats(alpha: Path, tmp_path: Path, name: str, magic: bytes) -> None:
    _, path = compare_runs([alpha], out=tmp_path / name)
    assert path == tmp_path / name
    assert path.read_bytes().startswith(magic)


def test_compare_out_directory_gets_compare_png(
    alpha: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["compare", str(alpha), "--out", str(existing)]) == 0
    assert capsys.readouterr().out.endswith(f"plot: {existing / 'compare.png'}\n")
    _assert_matplotlib_png(existing / "compare.png")
    new = tmp_path / "new"
    assert main(["compare", str(alpha), "--out", f"{new}/"]) == 0
    assert capsys.readouterr().out.endswith(f"plot: {new / 'compare.png'}\n")
    _assert_matplotlib_png(new / "compare.png")
    assert not (tmp_path / "new.png").exists()


def test_compare_default_plot_goes_next_to_the_runs(
    alpha: Path, beta: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["compare", str(alpha), str(beta)]) == 0
    assert capsys.readouterr().out.endswith(f"plot: {tmp_path / 'compare.png'}\n")
    _assert_matplotlib_png(tmp_path / "compare.png")
    assert list(elsewhere.iterdir()) == []
    other = tmp_path / "other" / "gamma"
    other.parent.mkdir()
    alpha.rename(other)  # runs in two directories: the first run's wins
    _, png = compare_runs([other, beta])
    assert png == other.parent / "compare.png"


# -- compare: eval sets ------------------------------------------------------------------


def _eval_rows() -> list[dict[str, Any]]:
    return [_round(0, {}, {}, 0, eval_loss=3.0), _round(1, {0: 5}, {0: 5}, 10, eval_loss=2.0)]


def test_compare_warns_when_eval_sets_differ(alpha: Path, tmp_path: Path) -> None:
    other = _write_run(tmp_path, "other", "fedit", _eval_rows(), [], seed=1,
                       data="eval_fraction = 0.2\n")
    table, _ = compare_runs([alpha, other], out=tmp_path / "c.png")
    assert "warning: these runs were scored on different eval sets" in table
    assert "  data.eval_fraction: alpha 0.1, other 0.2" in table  # alpha: the default
    assert "  run.seed: alpha 0, other 1" in table
    assert "data.source" not in table  # the same for both


def test_compare_eval_set_ignores_settings_a_run_does_not_use(alpha: Path, tmp_path: Path) -> None:
    """With a separate eval_source the split settings and the training source do not pick
    the eval examples, so differing there is no warning; a different eval_source is."""
    same = 'eval_source = "eval.jsonl"\n'
    a = _write_run(tmp_path, "a", "fedit", _eval_rows(), [], data=same)
    b = _write_run(tmp_path, "b", "fedit", _eval_rows(), [],
                   data=same + 'eval_fraction = 0.3\neval_split = "unseen"\n')
    table, _ = compare_runs([a, b], out=tmp_path / "c.png")
    assert "warning" not in table
    table, _ = compare_runs([a, alpha], out=tmp_path / "c.png")
    assert "  data.eval_source: a 'eval.jsonl', alpha None" in table
    assert "  data.source: a -, alpha 'builtin:tasks'" in table


def test_compare_eval_set_counts_evaluated_examples(tmp_path: Path) -> None:
    a = _write_run(tmp_path, "a", "fedit", _eval_rows(), [])
    b = _write_run(tmp_path, "b", "fedit", _eval_rows(), [])
    (b / "config.toml").write_text((b / "config.toml").read_text() + "\n[eval]\nmax_examples = 8\n")
    table, _ = compare_runs([a, b], out=tmp_path / "c.png")
    assert "  eval.max_examples: a 64, b 8" in table


# -- report: what the run directory argument is -----------------------------------------


def test_report_on_a_file_says_it_is_a_file(
    alpha: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = alpha / "metrics.jsonl"
    assert main(["report", str(metrics)]) == 2
    err = capsys.readouterr().err
    assert f"{metrics} is a file, not a run directory" in err
    assert "expected a directory holding metrics.jsonl" in err
    assert "not found" not in err


def test_report_on_a_directory_without_metrics(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(FedbitsError, match=r"holds no metrics\.jsonl") as err:
        write_report(tmp_path)
    assert str(err.value).startswith(str(tmp_path))


# -- report: rejected updates -----------------------------------------------------------


def _rejecting_run(tmp_path: Path, rejected: list[dict[str, str]]) -> Path:
    """Rounds 1.. of three clients each, ``rejected[i]`` the rejections of round i + 1."""
    rows = [_round(0, {}, {}, 0, eval_loss=3.0)]
    for rnd, rej in enumerate(rejected, start=1):
        row = _round(rnd, {0: 10, 1: 10, 2: 10}, {0: 20, 1: 20, 2: 20}, 90 * rnd, eval_loss=2.5)
        row["rejected"] = rej
        rows.append(row)
    return _write_run(tmp_path, "rej", "fedit", rows, [])


def test_report_lists_rejection_reasons(tmp_path: Path) -> None:
    mismatch = "encoded with a different codec chain than the server's"
    run_dir = _rejecting_run(tmp_path, [
        {"2": "non-finite | values"},
        {"0": mismatch, "1": mismatch},
        {},
        {"2": mismatch, "1": mismatch},
    ])
    text = write_report(run_dir).read_text()
    assert "**Updates accepted:** 7 of 12" in text
    assert "| reason | updates | rounds | clients |" in text
    section = text.split("## Rejected updates")[1]
    # most frequent reason first; rounds and clients collapsed into ranges
    assert section.index(mismatch) < section.index("non-finite")
    assert f"| {mismatch} | 4 | 2, 4 | 0-2 |" in text
    assert "| non-finite \\| values | 1 | 1 | 2 |" in text  # a pipe cannot split the cell
    assert "Rounds with no accepted update" not in text
    assert "No update was ever accepted" not in text


def test_report_says_when_no_update_was_ever_accepted(tmp_path: Path) -> None:
    every = {"0": "boom", "1": "boom", "2": "boom"}
    text = write_report(_rejecting_run(tmp_path, [every, every])).read_text()
    assert "**Updates accepted:** 0 of 6" in text
    assert "**No update was ever accepted**" in text
    assert "| boom | 6 | 1-2 | 0-2 |" in text
    assert "Rounds with no accepted update (model unchanged): 1-2" in text


def test_report_without_rejections_says_so(alpha: Path) -> None:
    text = write_report(alpha).read_text()
    assert "## Rejected updates\n\nNo update was rejected." in text
    assert "**Updates accepted:** 6 of 6" in text


def test_rejected_must_map_clients_to_reasons(alpha: Path) -> None:
    (alpha / "metrics.jsonl").write_text('{"round": 0, "rejected": [3]}\n')
    with pytest.raises(FedbitsError, match=r"metrics.jsonl:1: 'rejected' must map client ids"):
        load_run(alpha)


# -- percentages and plot axes ----------------------------------------------------------


@pytest.mark.parametrize(("metric", "value", "text"), [
    ("exact_match", 12.5, "12.50 %"), ("rougeL", 0.0, "0.00 %"), ("eval_loss", 2.2, "2.2000"),
    ("exact_match", None, "-"),
])
def test_format_metric_gives_percentages_a_unit(
    metric: str, value: float | None, text: str
) -> None:
    assert format_metric(metric, value) == text


def test_report_rounds_show_percent(alpha: Path) -> None:
    text = write_report(alpha).read_text()
    assert "| train loss | eval loss | perplexity | exact match |" in text
    assert "| 1.0000 | 2.2000 | 9.0250 | 30.00 % |" in text  # round 2


@pytest.mark.parametrize(("values", "bottom", "top"), [
    ([0.0, 0.0, 0.0], 0.0, 1.0),  # flat at 0: no negative ticks, a readable span
    ([90.0, 100.0, 100.0], None, 100.0),  # no axis above 100 %
])
def test_percent_axes_are_clamped(
    tmp_path: Path, values: list[float], bottom: float | None, top: float
) -> None:
    rows = [_round(r, {0: 10}, {0: 10}, 20 * r, exact_match=v, eval_loss=0.01 * r)
            for r, v in enumerate(values)]
    run = load_run(_write_run(tmp_path, "flat", "fedit", rows, []))
    for fig in (metric_vs_round_figure(run), metric_vs_bytes_figure(run)):
        loss_ax, em_ax = fig.axes
        assert em_ax.get_ylabel() == "exact match (%)"
        low, high = em_ax.get_ylim()
        assert high == top and low >= 0.0 and (bottom is None or low == bottom)
        assert loss_ax.get_ylim()[0] == 0.0  # a loss from 0: clamped, not padded below


@pytest.mark.parametrize(("first", "span"), [
    (5_300_000, 1.05), (26_000, 1.5), (1_050, 9), (26_000, 99), (1_000, 1e5), (5_300_000, 1e8),
])
def test_byte_ticks_are_few_distinct_and_apart(tmp_path: Path, first: int, span: float) -> None:
    """Ticks were "5.3 MB, 5.3 MB, 5.4 MB" on a narrow axis and crowded on a wide one."""
    cum = [round(first * span ** (i / 9)) for i in range(10)]
    rows = [_round(0, {}, {}, 0, eval_loss=3.0)] + [
        _round(r, {0: 1}, {0: 1}, c, eval_loss=2.0) for r, c in enumerate(cum, start=1)
    ]
    run = load_run(_write_run(tmp_path, "ticks", "fedit", rows, []))
    for fig in (metric_vs_bytes_figure(run), compare_figure([run], ["eval_loss"])):
        ax = fig.axes[0]
        fig.canvas.draw()
        low, high = ax.get_xlim()
        labels = [t for x, t in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True)
                  if low <= x <= high and t.get_text()]
        texts = [t.get_text() for t in labels]
        assert 2 <= len(texts) <= 7 and len(set(texts)) == len(texts), texts
        boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
        assert all(a.x1 + 10 < b.x0 for a, b in pairwise(boxes)), texts
