"""The command line: user errors are one clear message and exit 2, never a traceback."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from fedbits.cli import main

from conftest import REPO, TINY


def _user_error(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbits: error: ")
    for needle in needles:
        assert needle in err, err


def test_a_user_error_in_a_real_process_has_no_traceback():
    res = subprocess.run([sys.executable, "-m", "fedbits.cli", "run", str(TINY), "--set",
                          "clients.lrr=1"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "clients.lrr: unknown key" in res.stderr


def test_unknown_config_key(capsys):
    _user_error(capsys, ["run", str(TINY), "--set", "clients.lrr=1"], "clients.lrr", "unknown key")


def test_unknown_method_and_model(capsys):
    _user_error(capsys, ["run", str(TINY), "--set", "method.name=nope"], "method.name", "fedavg",
                "fedit")
    _user_error(capsys, ["run", str(TINY), "--set", "model.name=nope"], "model.name", "nope",
                "smollm2-135m")


def test_missing_data_file(capsys, tmp_path):
    _user_error(capsys, ["run", str(TINY), "--set", f"data.source={tmp_path / 'missing.jsonl'}",
                         "--set", f"run.out_dir={tmp_path}"], "missing.jsonl")


def test_malformed_jsonl_line_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "train.jsonl.gz"
    good = json.dumps({"prompt": "a", "completion": "b"})
    with gzip.open(path, "wt") as f:
        f.write(good + "\n" + good + "\n" + "{not json\n")
    _user_error(capsys, ["run", str(TINY), "--set", f"data.source={path}", "--set",
                         f"run.out_dir={tmp_path}"], "train.jsonl.gz", "line 3")


def test_methods_lists_options(capsys):
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "fedit" in out and "lora_r" in out and "server_opt" in out


def test_data_shows_partitions(capsys):
    assert main(["data", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert "240 examples, 216 train, 24 held out" in out
    assert "client     size  tasks  largest tasks" in out


@pytest.mark.parametrize("cmd", ["report", "compare"])
def test_report_commands_need_a_run(capsys, cmd, tmp_path):
    _user_error(capsys, [cmd, str(tmp_path / "norun")], "norun")


def test_run_report_compare(capsys, tmp_path):
    for name in ("a", "b"):
        assert main(["run", str(TINY), "--set", f"run.out_dir={tmp_path}", "--set",
                     f"run.name={name}", "--set", "run.rounds=1"]) == 0
    out = capsys.readouterr().out
    assert "round 1/1 | clients 3 | up " in out and "eval_loss" in out
    assert main(["report", str(tmp_path / "a")]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                 str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 1000
