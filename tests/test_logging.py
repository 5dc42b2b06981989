"""What fedbits prints: nothing as a library, plain lines from the command line, and
progress lines for long steps when nobody watches a terminal."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from fedbits import progress
from fedbits.cli import main
from fedbits.config import EvalSection, ModelSection
from fedbits.data.builtin import generate_builtin_tasks
from fedbits.data.format import tokenize_all
from fedbits.eval import evaluate
from fedbits.models import load_model

from conftest import REPO, TINY

FAST = ["run.rounds=1", "eval.metrics=['loss']", "eval.max_examples=4", "clients.local_steps=1"]
CUT = "clients.max_length=16"  # cuts every example: the run warns


def _sets(*overrides: str) -> list[str]:
    return [arg for kv in overrides for arg in ("--set", kv)]


def test_the_library_prints_nothing_unless_configured(tmp_path):
    """A program that uses fedbits and configures no logging sees no output, not even
    fedbits' warnings (a fresh interpreter: pytest's own log capture stays out)."""
    code = ("import sys\n"
            "from fedbits.resolve import load_config\n"
            "from fedbits.runtime import run_experiment\n"
            "run_experiment(load_config(sys.argv[1], sys.argv[2:]))\n")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(TINY), f"run.out_dir={tmp_path}", *FAST, CUT],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout, proc.stderr) == ("", "")
    assert (tmp_path / "tiny" / "final").is_dir()


def test_the_command_line_prints_plain_lines_and_marks_warnings(capsys, tmp_path):
    assert main(["run", str(TINY), *_sets(f"run.out_dir={tmp_path}", *FAST, CUT)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("model tiny-llama: ") and lines[-1].startswith("done: final model")
    assert "warning: 100% of examples are longer than clients.max_length=16" in out
    assert any(line.startswith("round 1/1 | clients 3") for line in lines)
    assert err == ""


def test_quiet_prints_only_warnings(capsys, tmp_path):
    assert main(["-q", "run", str(TINY), *_sets(f"run.out_dir={tmp_path}", *FAST, CUT)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines), out
    assert err == ""


def test_verbose_adds_each_clients_bytes(capsys, tmp_path):
    assert main(["-v", "run", str(TINY), *_sets(f"run.out_dir={tmp_path}", *FAST)]) == 0
    out = capsys.readouterr().out
    clients = [line for line in out.splitlines() if line.startswith("round 1: client ")]
    assert len(clients) == 3 and all(" B, up " in line for line in clients), out


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["-v", "-q", "methods"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.fixture
def evaluation():
    """A tiny model and 10 held-out examples: 3 loss and 3 generation batches of 4."""
    model, tokenizer = load_model(ModelSection(name="tiny-llama"), seed=0)
    examples = generate_builtin_tasks(2, seed=0)[:10]
    items, _ = tokenize_all(tokenizer, examples, 64)
    section = EvalSection(metrics=["loss", "rougeL"], max_new_tokens=2, batch_size=4)
    return lambda: evaluate(model, tokenizer, examples, items, section, max_length=64)


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating: ")]


def test_an_evaluation_off_a_terminal_logs_periodic_progress(evaluation, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fedbits")
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")  # a line for every batch
    evaluation()
    lines = _progress_lines(caplog)
    assert [line.split(" (")[0] for line in lines] == [
        f"evaluating: {i}/6 batches" for i in range(1, 7)], lines
    assert all(line.endswith(" s)") for line in lines)


def test_a_short_step_logs_no_progress_and_a_quiet_one_none_at_all(evaluation, caplog,
                                                                   monkeypatch):
    caplog.set_level(logging.INFO, logger="fedbits")
    evaluation()  # the default interval (30 s) is longer than the whole evaluation
    assert not _progress_lines(caplog)
    caplog.set_level(logging.WARNING, logger="fedbits")  # `fedbits -q`, or no configuration
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    evaluation()
    assert not _progress_lines(caplog)


def test_a_step_without_counts_logs_a_heartbeat(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fedbits")
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    monkeypatch.setattr(progress, "HEARTBEAT_MIN_S", 0.01)
    with progress.heartbeat("converting x.gguf", logger=logging.getLogger("fedbits.test")):
        time.sleep(0.2)
    beats = [r.getMessage() for r in caplog.records]
    assert beats and all(b.startswith("converting x.gguf: still working (") for b in beats)
