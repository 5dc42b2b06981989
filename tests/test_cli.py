"""The command line: user errors are one clear message and exit 2, never a traceback."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY


def _run(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedbits.cli", *args], capture_output=True,
                          text=True, cwd=cwd)


def _assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


def test_unknown_config_key():
    _assert_user_error(_run("run", str(TINY), "--set", "clients.lrr=1"), "clients.lrr",
                       "unknown key")


def test_unknown_method_and_model():
    _assert_user_error(_run("run", str(TINY), "--set", "method.name=nope"), "method.name",
                       "fedavg", "fedit")
    _assert_user_error(_run("run", str(TINY), "--set", "model.name=nope"), "model.name", "nope")


def test_missing_data_file(tmp_path):
    res = _run("run", str(TINY), "--set", f"data.source={tmp_path / 'missing.jsonl'}",
               "--set", f"run.out_dir={tmp_path}")
    _assert_user_error(res, "missing.jsonl")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    good = json.dumps({"prompt": "a", "completion": "b"})
    with gzip.open(path, "wt") as f:
        f.write(good + "\n" + good + "\n" + "{not json\n")
    res = _run("run", str(TINY), "--set", f"data.source={path}", "--set",
               f"run.out_dir={tmp_path}")
    _assert_user_error(res, "train.jsonl.gz", "line 3")


def test_methods_lists_options():
    res = _run("methods", "-v")
    assert res.returncode == 0
    assert "fedit" in res.stdout and "lora_r" in res.stdout and "server_opt" in res.stdout


@pytest.mark.parametrize("cmd", [["report"], ["compare"]])
def test_report_commands_need_a_run(cmd, tmp_path):
    _assert_user_error(_run(*cmd, str(tmp_path / "norun")), "norun")
