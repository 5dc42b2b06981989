"""What a new user types at ``fedbits flower`` and ``fedbits run`` on Flower, refused early.

Each test runs the command a user reported through :func:`fedbits.cli.main`, with
``FLWR_HOME`` in a temporary directory, and checks that a mistake stops before
anything starts or is written: a status of 2, a message naming the culprit, and the
files that were there unchanged. No Flower process is started; the tests that could
start one (a run without a connection) check that none did.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

from fedbits.cli import main

from conftest import TINY

NO_CONNECTION = "no SuperLink connection configured: run `fedbits flower connect"


@pytest.fixture
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$FLWR_HOME``: what a new user has before any ``flwr`` command."""
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


@pytest.fixture
def no_new_processes() -> Iterator[None]:
    """Fail if the test leaves a process behind (e.g. a ``flower-superlink`` daemon)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    left = [p for p in me.children(recursive=True) if p.pid not in before]
    commands = [" ".join(p.cmdline()) for p in left]
    for proc in left:
        proc.kill()
    assert not left, f"processes left running: {commands}"


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``fedbits`` printed for a refused command."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``argv``, which argparse must refuse (status 2); return its complaint."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# item 5: `runtime.kind=flower` without a SuperLink connection


@pytest.mark.parametrize("config, overrides, culprit", [
    (None, [], "config.toml does not exist"),
    # the file `flwr` writes on first use: its default connection is a local simulation
    (DEFAULT_FLOWER_CONFIG_TOML, [], "connection 'local'"),
    ('[superlink.sim.options]\nnum-supernodes = 2\n', ["runtime.superlink=sim"],
     "connection 'sim' in"),
    ('[superlink]\ndefault = "lab"\n[superlink.lab]\naddress = "10.0.0.5:8000"\ninsecure = true\n',
     ["runtime.superlink=typo"], "has no connection 'typo'"),
])
def test_a_flower_run_without_a_superlink_connection_starts_nothing(
        flwr_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        no_new_processes: None, config: str | None, overrides: list[str], culprit: str) -> None:
    """Left to itself, ``flwr run`` would start its own local simulation SuperLink with
    dependency installation on (pages of uv output, a traceback, a daemon left
    running): refused before anything starts, in one line saying what to do."""
    if config is not None:
        flwr_home.mkdir()
        (flwr_home / "config.toml").write_text(config)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    sets = ["runtime.kind=flower", f"run.out_dir={tmp_path / 'runs'}", *overrides]
    assert main(["run", str(TINY), *[a for s in sets for a in ("--set", s)]]) == 2
    err = _error(capsys)
    assert NO_CONNECTION in err and culprit in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no run dir, no local SuperLink


def test_following_a_run_without_a_connection_starts_nothing(
        flwr_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        no_new_processes: None) -> None:
    """``fedbits flower follow`` calls ``flwr log``, which would start the same daemon."""
    assert main(["flower", "follow", "7", "--run-dir", str(tmp_path / "run")]) == 2
    assert NO_CONNECTION in _error(capsys)
    assert not flwr_home.exists()


# item 11: the `fedbits flower` helpers


def test_certs_run_again_keeps_the_ca_unless_forced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second ``certs`` would lock out every node and operator holding the old CA:
    refused, naming the files and the two ways on (``--renew``, ``--force``)."""
    certs = ["flower", "certs", str(tmp_path / "tls"), "--host", "127.0.0.1"]
    assert main(certs) == 0
    first = _files(tmp_path / "tls")
    assert set(first) == {"ca.crt", "ca.key", "superlink.crt", "superlink.key"}
    capsys.readouterr()

    assert main(certs) == 2
    err = _error(capsys)
    assert "ca.crt" in err and "--renew" in err and "--force" in err
    assert _files(tmp_path / "tls") == first

    (tmp_path / "tls" / "superlink.crt").unlink()  # a partial set: still refused as a whole
    assert main(certs) == 2
    assert _files(tmp_path / "tls") == {k: v for k, v in first.items() if k != "superlink.crt"}

    assert main(certs + ["--force"]) == 0
    again = _files(tmp_path / "tls")
    assert again.keys() == first.keys() and again["ca.crt"] != first["ca.crt"]
    assert (tmp_path / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600


def test_an_overwrite_on_flower_is_refused_before_anything_starts(
        flwr_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        no_new_processes: None) -> None:
    """The SuperLink host never deletes a run directory because a submitted run asks:
    ``--overwrite`` is refused on the operator's side, saying what the host's operator
    does instead; nothing is submitted or written."""
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "lab"\n[superlink.lab]\naddress = "127.0.0.1:1"\n'
        'insecure = true\n')
    before = sorted(p.name for p in tmp_path.rglob("*"))
    sets = ["runtime.kind=flower", f"run.out_dir={tmp_path / 'runs'}", "run.name=mine"]
    assert main(["run", str(TINY), *[a for s in sets for a in ("--set", s)],
                 "--overwrite"]) == 2
    err = _error(capsys)
    assert "--overwrite does not apply to a run on Flower" in err
    assert "rm -r RUNS_DIR/mine" in err and "--runs-dir" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_the_app_carries_no_overwrite_flag(tmp_path: Path) -> None:
    """A submitted app cannot ask the SuperLink host to delete anything: its run config
    holds the fedbits config, the resume flag and an empty slot for the operator's
    signature (an override) only, and ``--overwrite`` is gone."""
    assert main(["flower", "app", str(TINY), "--out", str(tmp_path), "--resume"]) == 0
    pyproject = tomllib.loads((tmp_path / "fedbits-app" / "pyproject.toml").read_text())
    config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(config) == {"fedbits-config", "fedbits-resume", "fedbits-signature"}
    assert config["fedbits-resume"] and config["fedbits-signature"] == ""
    with pytest.raises(SystemExit) as exit_:
        main(["flower", "app", str(TINY), "--out", str(tmp_path / "b"), "--overwrite"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("name, address, culprit", [
    ("bad name", "10.0.0.5:8000", "'bad name'"),
    ("default", "10.0.0.5:8000", "'default'"),
    ("lab", "nohostport", "'nohostport' is not HOST:PORT"),
    ("lab", "10.0.0.5:0", "port 0"),
    ("lab", "10.0.0.5:65536", "port 65536"),
    ("lab", "2001:db8::5:8000", "is not HOST:PORT"),  # IPv6 needs brackets
    ("lab", "[10.0.0.5]:8000", "'10.0.0.5' is not a host name"),
    ("lab", "10.0.0.999:8000", "'10.0.0.999' is not a host name"),
    ("lab", "bad_host:8000", "'bad_host' is not a host name"),
])
def test_connect_refuses_a_bad_name_or_address(
        flwr_home: Path, capsys: pytest.CaptureFixture[str], name: str, address: str,
        culprit: str) -> None:
    """``connect "bad name" --address nohostport`` used to be written, as the default."""
    assert main(["flower", "connect", name, "--address", address, "--insecure"]) == 2
    assert culprit in _error(capsys)
    assert not flwr_home.exists()


def test_connect_makes_the_default_only_the_first_connection_or_when_asked(
        flwr_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Adding a connection must not redirect every later ``fedbits run``."""
    from flwr.cli.flower_config import read_superlink_connection

    def connect(name: str, address: str, *extra: str) -> str:
        assert main(["flower", "connect", name, "--address", address, "--insecure",
                     *extra]) == 0
        return capsys.readouterr().out

    assert "'lab' is flwr's default" in connect("lab", "10.0.0.5:8000")
    assert "stays 'lab'" in connect("v6", "[2001:db8::5]:8000")
    assert read_superlink_connection().name == "lab"
    assert read_superlink_connection("v6").address == "[2001:db8::5]:8000"
    assert "'prod' is flwr's default" in connect("prod", "superlink.example.org:443", "--default")
    assert read_superlink_connection().name == "prod"


def test_connect_keeps_flowers_own_default(
        flwr_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ``~/.flwr`` that ``flwr`` created has a default (its local simulation): it stays
    until ``--default``, and ``fedbits run`` says why it refuses it."""
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(DEFAULT_FLOWER_CONFIG_TOML)
    assert main(["flower", "connect", "lab", "--address", "10.0.0.5:8000", "--insecure"]) == 0
    assert "stays 'local'" in capsys.readouterr().out
    assert main(["flower", "connect", "lab", "--address", "10.0.0.5:8000", "--insecure",
                 "--default"]) == 0
    assert "'lab' is flwr's default" in capsys.readouterr().out


@pytest.mark.parametrize("argv, culprit", [
    (["--partition-id", "-3"], "argument --partition-id: '-3' is not a non-negative integer"),
    (["--partition-id", "x"], "argument --partition-id: 'x' is not a non-negative integer"),
    (["--partition-id", "0", "--runtime-port", "0"], "argument --runtime-port: '0'"),
    (["--partition-id", "0", "--runtime-port", "70000"], "argument --runtime-port: '70000'"),
    (["--client-id", "0", "--partition-id", "0"], "not allowed with argument"),
    (["--client-id", "0", "--allow-model", ""], "argument --allow-model: '' is not a name"),
    (["--client-id", "0", "--allow-method", "fedit\nfedkseed"],
     "argument --allow-method: 'fedit\\nfedkseed' is not a name"),
    (["--client-id", "0", "--max-rounds", "0"], "argument --max-rounds: '0' is not a positive"),
    (["--client-id", "0", "--max-payload-mb", "nan"],
     "argument --max-payload-mb: 'nan' is not a positive number"),
])
def test_supernode_refuses_bad_numbers_before_starting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_new_processes: None,
        argv: list[str], culprit: str) -> None:
    """Bad numbers and pins are refused while parsing: ``--partition-id -3`` used to
    start a SuperNode that failed at its first round."""
    err = _usage_error(capsys, ["flower", "supernode", "--superlink", "127.0.0.1:1",
                                "--insecure", "--dir", str(tmp_path / "node"), *argv])
    assert culprit in err
    assert not (tmp_path / "node").exists()


@pytest.mark.parametrize("argv, culprit", [
    (["--client-id", "0"], "--data (this data holder's own data) goes with --client-id N"),
    (["--partition-id", "0", "--data", "DATA"], "--data (this data holder's own data) goes"),
    (["--client-id", "0", "--data", "missing.jsonl"], "--data missing.jsonl: not found"),
    (["--client-id", "0", "--data", "DATA"], "must say which models and methods it accepts"),
    (["--client-id", "0", "--data", "DATA", "--allow-model", "tiny-llama"],
     "must say which models and methods it accepts"),
    (["--client-id", "0", "--data", "DATA", "--allow-method", "fedit", "--allow-model",
      "/no/such/model"], "--allow-model /no/such/model: not found on this node"),
    (["--client-id", "0", "--data", "BAD", "--allow-method", "fedit", "--allow-model",
      "tiny-llama"], "BAD: line 2: invalid JSON"),
])
def test_a_data_holders_mistake_is_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_new_processes: None,
        monkeypatch: pytest.MonkeyPatch, argv: list[str], culprit: str) -> None:
    """A node that would start without its data, or accepting anything, is refused with
    the flag named; a damaged data file is named with its line before the node starts."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DATA").write_text('{"prompt": "1 + 1 =", "completion": " 2"}\n')
    (tmp_path / "BAD.jsonl").write_text('{"prompt": "1 + 1 =", "completion": " 2"}\n{oops\n')
    argv = [a.replace("BAD", str(tmp_path / "BAD.jsonl")) for a in argv]
    assert main(["flower", "supernode", "--superlink", "127.0.0.1:1", "--insecure",
                 "--dir", str(tmp_path / "node"), *argv]) == 2
    assert culprit.replace("BAD", str(tmp_path / "BAD.jsonl")) in _error(capsys)
    assert not (tmp_path / "node").exists()


def test_supernode_and_superlink_refuse_a_bad_address_or_port(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_new_processes: None) -> None:
    """Caught while parsing, not as a Flower connection error minutes later."""
    err = _usage_error(capsys, ["flower", "supernode", "--superlink", "nohostport",
                                "--partition-id", "0", "--insecure"])
    assert "argument --superlink: address 'nohostport' is not HOST:PORT" in err
    err = _usage_error(capsys, ["flower", "superlink", "--port", "0", "--insecure",
                                "--dir", str(tmp_path / "link")])
    assert "argument --port: '0'" in err
    assert not (tmp_path / "link").exists()


def test_app_refuses_an_existing_app_directory_unless_forced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``flwr run`` bundles whatever the app directory holds; replacing it silently
    could ship another run's config."""
    app = ["flower", "app", str(TINY), "--out", str(tmp_path / "out")]
    assert main(app) == 0
    pyproject = tmp_path / "out" / "fedbits-app" / "pyproject.toml"
    pyproject.write_text("# the user's edits\n")
    capsys.readouterr()

    assert main([*app, "--set", "run.rounds=9"]) == 2
    err = _error(capsys)
    assert str(pyproject.parent) in err and "--force" in err
    assert pyproject.read_text() == "# the user's edits\n"

    assert main([*app, "--set", "run.rounds=9", "--force"]) == 0
    assert "rounds = 9" in pyproject.read_text()


def test_flower_without_a_subcommand_lists_them(capsys: pytest.CaptureFixture[str]) -> None:
    """``fedbits flower`` alone used to say only "required: flower_command"."""
    with pytest.raises(SystemExit) as exit_:
        main(["flower"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for command in ("certs", "superlink", "supernode", "connect", "app", "follow"):
        assert f"\n    {command} " in err, err
    assert "flower_command" not in err
