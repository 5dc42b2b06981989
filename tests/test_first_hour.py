"""What a new user hits in the first hour (issue 13): each reported command, reproduced.

Runs lost to a bad name or a failed ``--overwrite``, duplicated metrics rows after a
resume, tracebacks instead of one line, silently rejected or truncated training: every
test here runs the real command (CLI or ``run_experiment``) on the tiny model.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedbits.cli import main
from fedbits.data.examples import load_examples
from fedbits.errors import ConfigError, DataError
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment

from conftest import REPO, TINY, assert_same_final_and_ledger

FAST = ["run.rounds=1", "eval.metrics=['loss']", "eval.max_examples=4", "clients.local_steps=1"]


def _sets(*overrides: str) -> list[str]:
    return [arg for kv in overrides for arg in ("--set", kv)]


def _rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").open()]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content: "nothing was deleted or changed"."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed one-round tiny run under an out_dir that also holds another run."""
    out = tmp_path_factory.mktemp("runs")
    run_experiment(load_config(TINY, [f"run.out_dir={out}", "run.name=old", *FAST]))
    run_experiment(load_config(TINY, [f"run.out_dir={out}", "run.name=other", *FAST]))
    return out / "old"


# -- 1. a run directory is one validated name under out_dir ---------------------------
@pytest.mark.parametrize("name", ["", ".", "..", "../x", "../../tmp/x", "/abs", "a/b", "a\\b",
                                  "line\nbreak", "tab\there"])
def test_a_bad_run_name_exits_non_zero_and_deletes_nothing(capsys, finished_run, name):
    out = finished_run.parent
    before = _snapshot(out)
    assert main(["run", str(TINY), *_sets(f"run.out_dir={out}", *FAST), "--set",
                 f"run.name={json.dumps(name)}", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbits: error: ") and "run.name" in err, err
    assert _snapshot(out) == before


# -- 2. --overwrite deletes only after everything is built, and only a fedbits run ----
@pytest.mark.parametrize("bad", [
    "data.source={bad_data}",
    "method.target_modules=['nonexistent_proj']",
    "data.partition=natural",  # 6 clients but builtin:tasks has another number of tasks
    "run.seed=-1",
    "model.name=./no-such-model",
])
def test_a_failed_overwrite_keeps_the_old_run(capsys, finished_run, tmp_path, bad):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    before = _snapshot(finished_run)
    argv = ["run", str(TINY), *_sets(f"run.out_dir={finished_run.parent}", "run.name=old", *FAST,
                                     bad.format(bad_data=bad_data)), "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbits: error: ") and "Traceback" not in err
    assert _snapshot(finished_run) == before


def test_overwrite_refuses_a_directory_that_is_not_a_fedbits_run(capsys, tmp_path):
    precious = tmp_path / "runs" / "notes"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    assert main(["run", str(TINY), *_sets(f"run.out_dir={tmp_path / 'runs'}", "run.name=notes",
                                          *FAST), "--overwrite"]) == 2
    assert "does not hold a fedbits run" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"


# -- 3 + acceptance: killed anywhere, resumed: each round exactly once ----------------
def test_resuming_after_round_0_writes_round_0_once(tmp_path):
    common = [f"run.out_dir={tmp_path}", *FAST]
    run_dir = run_experiment(load_config(TINY, [*common, "run.rounds=0"]))
    assert _rounds(run_dir) == [0]
    run_experiment(load_config(TINY, [*common, "run.rounds=2"]), resume=True)
    assert _rounds(run_dir) == [0, 1, 2]


def _kill_when(argv: list[str], ready) -> None:
    """Start ``fedbits`` with ``argv`` and SIGKILL it as soon as ``ready()`` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "fedbits.cli", *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


KILL_RUN = ["run.rounds=2", "eval.metrics=['loss']", "eval.max_examples=8"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    return run_experiment(load_config(TINY, [f"run.out_dir={out}", *KILL_RUN]))


@pytest.mark.parametrize("lines_written", [0, 1], ids=["during round 0", "after round 0"])
def test_killed_around_round_0_and_resumed_each_round_appears_once(
    tmp_path, uninterrupted, lines_written
):
    """Killed once the config is saved (round 0 evaluating) or once round 0's row is
    written (before or after its checkpoint); the mid-run case is in test_runtime."""
    victim = tmp_path / "tiny"
    metrics = victim / "metrics.jsonl"

    def ready() -> bool:
        if lines_written == 0:
            return (victim / "config.toml").is_file()
        return metrics.is_file() and metrics.read_text().count("\n") >= lines_written

    _kill_when(["run", str(TINY), *_sets(f"run.out_dir={tmp_path}", *KILL_RUN)], ready)
    assert not (victim / "final").exists(), "the run must be killed before it ends"
    assert main(["run", str(TINY), *_sets(f"run.out_dir={tmp_path}", *KILL_RUN), "--resume"]) == 0
    assert _rounds(victim) == [0, 1, 2]
    assert_same_final_and_ledger(uninterrupted, victim)


# -- 4. one line, never a traceback ---------------------------------------------------
def test_damaged_gzip_data_is_one_clear_error(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b"}\n' * 500))
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="train.jsonl.gz: cannot read file"):
        load_examples(str(path))


def test_a_config_that_is_not_utf8_text(capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary")
    assert main(["run", str(config)]) == 2
    assert "run.toml: not a UTF-8 text file" in capsys.readouterr().err


def test_target_modules_and_seed_errors_write_nothing(capsys, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", str(TINY), *_sets(f"run.out_dir={out}", *FAST,
                                          "method.target_modules=['nonexistent_proj']")]) == 2
    err = capsys.readouterr().err
    assert "method.target_modules" in err and "q_proj" in err  # names what the model has
    assert not out.exists(), "nothing is written before everything is built"
    assert main(["run", str(TINY), *_sets(f"run.out_dir={out}", "run.seed=-1")]) == 2
    assert "run.seed" in capsys.readouterr().err


def test_an_out_dir_that_cannot_hold_runs(capsys, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out_dir in (a_file, a_file / "below"):
        assert main(["run", str(TINY), *_sets(f"run.out_dir={out_dir}", *FAST)]) == 2
        err = capsys.readouterr().err
        assert "run.out_dir" in err and "not a directory" in err, err
    assert a_file.read_text() == "x"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError):
        main(["--debug", "run", str(TINY), "--set", "run.seed=-1"])


def test_a_closed_stdout_pipe_does_not_stop_the_run(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedbits.cli", "run", str(TINY),
         *_sets(f"run.out_dir={tmp_path}", *FAST, "run.rounds=2")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "BrokenPipeError" not in err
    assert (tmp_path / "tiny" / "final").is_dir()
    assert _rounds(tmp_path / "tiny") == [0, 1, 2]


# -- 6. valid JSONL is accepted -------------------------------------------------------
def test_jsonl_with_unicode_line_separators_in_strings_and_a_bom(tmp_path):
    texts = ["a\u2028b", "c\u2029d", "e\u0085f"]
    path = tmp_path / "sep.jsonl"
    body = "\n".join(json.dumps({"prompt": t, "completion": t}, ensure_ascii=False) for t in texts)
    path.write_text("\ufeff" + body + "\r\n", encoding="utf-8")
    assert [ex.prompt for ex in load_examples(str(path))] == texts


# -- 7. a run that never accepted an update fails -------------------------------------
def test_a_run_with_no_accepted_update_exits_non_zero_with_the_reasons(capsys, tmp_path):
    argv = ["run", str(TINY), *_sets(f"run.out_dir={tmp_path}", *FAST,
                                     "runtime.max_payload_mb=0.001")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no client update was accepted in 1 round" in err, err
    assert "exceeds the limit of 1000" in err, err
    report = (tmp_path / "tiny" / "report.md").read_text()
    assert "exceeds the limit of 1000" in report


# -- 8. the saved config and the resume rules -----------------------------------------
def test_config_toml_holds_the_method_defaults_and_resume_rules(capsys, tmp_path):
    common = [f"run.out_dir={tmp_path}", *FAST, "run.rounds=2"]
    run_dir = run_experiment(load_config(TINY, common))
    saved = (run_dir / "config.toml").read_text()
    for key in ("lora_r = 16", "lora_alpha = 16.0", "server_opt = ", "server_lr = ",
                "error_feedback = false"):
        assert key in saved, key
    before = _snapshot(run_dir)
    assert main(["run", str(TINY), *_sets(*common[:-1], "run.rounds=1"), "--resume"]) == 2
    assert "completed 2 rounds" in capsys.readouterr().err
    assert main(["run", str(TINY), *_sets(*common), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert _snapshot(run_dir) == before


# -- 9. truncation is counted and warned about ----------------------------------------
def test_truncation_is_counted_in_the_header_and_metrics(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedbits")
    run_dir = run_experiment(load_config(TINY, [f"run.out_dir={tmp_path}", *FAST,
                                                "clients.max_length=16"]))
    assert any(r.levelno == logging.INFO and r.getMessage().startswith("max_length 16 cuts ")
               for r in caplog.records), caplog.text
    assert any(r.levelno == logging.WARNING and "clients.max_length=16" in r.getMessage()
               for r in caplog.records), caplog.text
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert rows[0]["eval_truncated"] == 4
    assert rows[1]["truncated"] > 0
    roomy = run_experiment(load_config(TINY, [f"run.out_dir={tmp_path}", "run.name=roomy", *FAST,
                                              "clients.max_length=4096"]))
    assert [json.loads(line).get("truncated") for line in (roomy / "metrics.jsonl").open()] == [
        None, 0]


# -- 13. the smaller ones -------------------------------------------------------------
def test_per_round_above_the_client_count_is_an_error():
    with pytest.raises(ConfigError, match=r"clients.per_round=20 is more than data.num_clients"):
        load_config(TINY, ["clients.per_round=20"])


def test_validator_messages_carry_no_pydantic_internals():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["clients.fraction=0.5"])  # tiny.toml sets per_round
    assert "Value error" not in str(err.value)
    assert "clients: set either clients.per_round or clients.fraction" in str(err.value)


def test_model_command_on_a_directory_that_is_no_model(capsys, tmp_path):
    assert main(["model", str(tmp_path)]) == 2
    assert "not a model directory: it holds no config.json" in capsys.readouterr().err


def test_data_command_names_the_tasks(capsys):
    assert main(["data", str(TINY)]) == 0
    table = capsys.readouterr().out.split("largest tasks\n")[1].splitlines()
    assert len(table) == 6  # tiny.toml: 6 clients
    assert all(re.search(r"[a-z_]+ \(\d+\)", row) for row in table), table


def test_a_single_example_data_set_says_it_is_not_evaluated(tmp_path, caplog):
    path = tmp_path / "one.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    run_experiment(load_config(TINY, [f"run.out_dir={tmp_path}", f"data.source={path}", *FAST,
                                      "data.num_clients=1", "clients.per_round=1"]))
    assert any(r.levelno == logging.WARNING and "no held-out examples (1 examples" in r.getMessage()
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("field, value, reason", [
    ("truncated", -1, "truncated=-1"),
    ("truncated", 2**40, "is not a count"),
    ("info", "[1, 2]", "must be JSON objects"),
    ("stats", '"x"', "must be JSON objects"),
])
def test_a_hostile_node_reply_count_or_info_is_refused(field, value, reason):
    """A node reports its truncation count and info; the server bounds and types them."""
    from fedbits.errors import FedbitsError
    from fedbits.runtime.flower.protocol import RECORD, NodeReply

    content = NodeReply(blob=b"x", partition=0).to_content()
    content.config_records[RECORD][field] = value
    with pytest.raises(FedbitsError, match=reason):
        NodeReply.from_content(content)
