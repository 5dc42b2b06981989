"""A Flower deployment data holders can trust: hostile input never crashes or misdirects it.

- A node's reply is parsed field by field against stated bounds; every hostile value
  below becomes a clear :class:`FedbitsError` (the server turns it into that node's
  rejection, see ``test_flower.py`` for the real-SuperLink case), never another
  exception.
- The SuperLink host, not the submitted run, decides where runs are written, and an
  existing run directory is never deleted because a run asks.
- Private keys are new files of mode 0600, never written through a symbolic link, and
  replaced only with ``--force``; a node makes its own key pair; the CA is kept and
  the SuperLink certificate renewed from it.
- A silent connection to a node worker is dropped after a timeout: a real worker
  process keeps serving a real client.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.app import ConfigRecord, RecordDict

from fedbits.cli import main
from fedbits.errors import FedbitsError
from fedbits.resolve import load_config
from fedbits.runtime import open_run_dir
from fedbits.runtime.flower import worker
from fedbits.runtime.flower.certs import CA_VALID_DAYS, SERVER_VALID_DAYS
from fedbits.runtime.flower.holder import NodeSettings
from fedbits.runtime.flower.processes import RUNS_DIR_ENV, runs_root
from fedbits.runtime.flower.protocol import (
    MAX_COUNT,
    MAX_ENTRIES,
    MAX_ERROR_CHARS,
    MAX_INT,
    MAX_JSON_CHARS,
    MAX_KEY_CHARS,
    MAX_TEXT_CHARS,
    RECORD,
    NodeReply,
    Request,
)
from fedbits.runtime.flower.server_app import host_run_dir, train_reply

from conftest import TINY

# -- item 1: a node's reply ------------------------------------------------------------

GOOD: dict[str, Any] = {"error": "", "partition": 2, "stats": '{"loss": 1.5, "steps": 3}',
                        "info": '{"pid": 7}', "truncated": 0, "blob": b"uplink"}


def _content(**fields: Any) -> RecordDict:
    """A reply record: :data:`GOOD` with ``fields`` changed (``None`` drops a field)."""
    rec = {k: v for k, v in {**GOOD, **fields}.items() if v is not None}
    return RecordDict({RECORD: ConfigRecord(rec)})


def test_a_reply_at_every_bound_is_accepted() -> None:
    info = {f"k{i:0{MAX_KEY_CHARS - 1}d}": i for i in range(MAX_ENTRIES - 6)}
    info.update(text="x" * MAX_TEXT_CHARS, big=MAX_INT, small=-MAX_INT, ratio=0.25,
                flag=True, nothing=None)
    assert len(info) == MAX_ENTRIES
    reply = NodeReply.from_content(_content(info=json.dumps(info), partition=MAX_COUNT,
                                            truncated=MAX_COUNT))
    assert reply.info == info and reply.partition == reply.truncated == MAX_COUNT
    assert reply.blob == b"uplink" and reply.stats == {"loss": 1.5, "steps": 3}
    # what a real node sends comes back unchanged
    sent = NodeReply(blob=b"u", partition=1, stats={"loss": 0.5}, info={"pid": 3, "reused": True},
                     truncated=4)
    assert NodeReply.from_content(sent.to_content()) == sent


DEEP = "[" * 5000 + "]" * 5000  # under MAX_JSON_CHARS, but deeper than the JSON parser goes


@pytest.mark.parametrize("fields, culprit", [
    ({"info": "[1, 2]"}, "must be JSON objects, 'info' is a list"),
    ({"info": '"text"'}, "must be JSON objects, 'info' is a str"),
    ({"info": "null"}, "must be JSON objects, 'info' is a NoneType"),
    ({"info": DEEP}, "'info' is nested too deeply"),
    ({"stats": DEEP}, "'stats' is nested too deeply"),
    ({"info": "{" * (MAX_JSON_CHARS + 1)}, f"over {MAX_JSON_CHARS}"),
    ({"info": "{'single': 1}"}, "'info' is not valid JSON"),
    ({"info": 5}, "'info' is a int, not JSON text"),
    ({"info": '{"a": {"b": 1}}'}, "'info' entry 'a' is a JSON dict"),
    ({"info": '{"a": [1]}'}, "'info' entry 'a' is a JSON list"),
    ({"info": '{"a": NaN}'}, "NaN is not a finite number"),
    ({"info": '{"a": -Infinity}'}, "-Infinity is not a finite number"),
    ({"info": '{"a": 1e999}'}, "'info' entry 'a' is inf, not a finite number"),
    ({"info": json.dumps({"a": 2**64})}, "'info' entry 'a' is an integer beyond"),
    ({"info": json.dumps({"a": "x" * (MAX_TEXT_CHARS + 1)})}, f"over {MAX_TEXT_CHARS}"),
    ({"info": json.dumps({str(i): i for i in range(MAX_ENTRIES + 1)})},
     f"'info' has {MAX_ENTRIES + 1} entries, over {MAX_ENTRIES}"),
    ({"info": json.dumps({"k" * (MAX_KEY_CHARS + 1): 1})},
     f"'info' has a key of {MAX_KEY_CHARS + 1} characters"),
    ({"stats": "[]"}, "must be JSON objects, 'stats' is a list"),
    ({"stats": json.dumps({str(i): 1 for i in range(MAX_ENTRIES + 1)})}, "'stats' has"),
    ({"error": 5}, "'error' is a int, not a string"),
    ({"partition": "3"}, "'partition' is a str, not an integer"),
    ({"partition": True}, "'partition' is a bool, not an integer"),
    ({"partition": -2}, "partition=-2 is not a count in -1.."),
    ({"partition": MAX_COUNT + 1}, f"partition={MAX_COUNT + 1} is not a count"),
    ({"truncated": -1}, "truncated=-1 is not a count in 0.."),
    ({"blob": "text"}, "'blob' is a str, not bytes"),
    ({"info": None}, "no 'info' field"),
    ({"evil": "x", "more": 1}, "unexpected fields 'evil', 'more'"),
])
def test_a_hostile_reply_is_a_clear_error_naming_the_field(fields: dict[str, Any],
                                                           culprit: str) -> None:
    with pytest.raises(FedbitsError) as e:
        NodeReply.from_content(_content(**fields))
    assert str(e.value).startswith("malformed node reply: ")
    assert culprit in str(e.value)


def test_a_reply_without_the_fedbits_record_is_refused() -> None:
    with pytest.raises(FedbitsError, match="no 'fedbits' config record"):
        NodeReply.from_content(RecordDict({"other": ConfigRecord({"error": ""})}))


def test_a_nodes_error_text_is_one_bounded_line() -> None:
    """A node's error lands in the server's log and ``metrics.jsonl``: no terminal
    escapes or forged log lines, and no megabytes."""
    hostile = "boom\n[fedbits] round 9 accepted\x1b[2J" + "x" * (3 * MAX_ERROR_CHARS)
    error = NodeReply.from_content(_content(error=hostile)).error
    assert error.startswith("boom [fedbits] round 9 accepted [2J")
    assert "\n" not in error and "\x1b" not in error
    assert error.endswith(f"... ({len(hostile) - MAX_ERROR_CHARS} more characters)")
    assert len(error) < MAX_ERROR_CHARS + 40


WHO = "SuperNode 7 (partition 2)"


@pytest.mark.parametrize("fields, reason", [
    ({"error": "the method failed"}, "the method failed"),  # the node's own text, as simulated
    ({"error": "failed", "blob": b"an uplink too"}, "failed"),  # an error wins over a blob
    ({"partition": 3}, f"{WHO}: its reply is for partition 3, not 2"),
    ({"blob": None}, f"{WHO}: its reply holds neither an uplink nor an error"),
    ({"stats": '{"loss": "low"}'}, f"{WHO}: stat 'loss' is 'low', not a finite number"),
])
def test_a_train_reply_that_cannot_be_used_rejects_only_that_client(
        fields: dict[str, Any], reason: str) -> None:
    reply = train_reply(NodeReply.from_content(_content(**fields)), WHO, client=2)
    assert reply.uplink is None and reply.error == reason


def test_a_good_train_reply_is_settled_with_its_uplink_and_stats() -> None:
    reply = train_reply(NodeReply.from_content(_content(truncated=5)), WHO, client=2)
    assert (reply.uplink, reply.error, reply.stats, reply.truncated) == (
        b"uplink", "", {"loss": 1.5, "steps": 3}, 5)


# -- item 2: the SuperLink host decides where runs go -----------------------------------


def _cfg(out_dir: Path, name: str = "victim") -> Any:
    return load_config(TINY, [f"run.out_dir={out_dir}", f"run.name={name}"])


def test_a_submitted_out_dir_is_ignored(tmp_path: Path) -> None:
    """A run submitted with ``run.out_dir`` naming another place on the SuperLink host
    (here a directory holding someone's run of the same name) is written under the
    host's runs directory; the other place is not touched."""
    elsewhere = tmp_path / "home" / "someone"
    (elsewhere / "victim").mkdir(parents=True)
    (elsewhere / "victim" / "config.toml").write_text("precious")
    root = tmp_path / "runs"
    cfg = _cfg(elsewhere)
    run_dir = host_run_dir(cfg, resume=False, root=root)
    assert run_dir == root / "victim" and cfg.run.out_dir == str(root)
    open_run_dir(cfg, resume=False, overwrite=False)
    assert (root / "victim" / "config.toml").is_file()
    assert f'out_dir = "{root}"' in (root / "victim" / "config.toml").read_text()
    assert (elsewhere / "victim" / "config.toml").read_text() == "precious"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim"]


def test_an_existing_run_directory_is_resumed_or_refused_never_deleted(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    cfg = _cfg(tmp_path / "anything")
    host_run_dir(cfg, resume=False, root=root)
    open_run_dir(cfg, resume=False, overwrite=False)
    (root / "victim" / "metrics.jsonl").write_text("round 1\n")
    before = sorted(p.name for p in (root / "victim").iterdir())

    with pytest.raises(FedbitsError) as e:
        host_run_dir(_cfg(tmp_path / "anything"), resume=False, root=root)
    message = str(e.value)
    assert f"run directory {root / 'victim'} already exists on the SuperLink host" in message
    assert "--resume" in message and f"rm -r {root / 'victim'}" in message
    assert sorted(p.name for p in (root / "victim").iterdir()) == before
    assert (root / "victim" / "metrics.jsonl").read_text() == "round 1\n"

    assert host_run_dir(_cfg(tmp_path / "other"), resume=True, root=root) == root / "victim"


def test_the_runs_root_is_the_hosts_setting(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RUNS_DIR_ENV, raising=False)
    assert runs_root() == Path.home() / ".fedbits" / "superlink" / "runs"
    monkeypatch.setenv(RUNS_DIR_ENV, str(tmp_path / "runs"))
    assert runs_root() == tmp_path / "runs"
    monkeypatch.setenv(RUNS_DIR_ENV, "relative/runs")
    with pytest.raises(FedbitsError, match="'relative/runs' is not an absolute path"):
        runs_root()


# -- items 3-5: keys and certificates ------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would leave new files world-writable: key files must not rely on it."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_keygen_makes_a_node_key_pair_that_stays_private(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], open_umask: None) -> None:
    key = tmp_path / "node" / "auth-key"
    assert main(["flower", "keygen", str(key)]) == 0
    out = capsys.readouterr().out
    public = key.with_name("auth-key.pub")
    assert _mode(key) == 0o600 and _mode(key.parent) == 0o700
    assert _mode(public) == 0o644
    # the pair Flower uses: an OpenSSH private key whose public half is the .pub file
    private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    line = public.read_text().strip()
    assert line.startswith("ecdsa-sha2-nistp384 ")
    assert private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode() == line
    assert line in out.splitlines() and "flwr supernode register auth-key.pub" in out

    first = key.read_bytes(), public.read_bytes()
    assert main(["flower", "keygen", str(key)]) == 2
    err = capsys.readouterr().err
    assert str(key) in err and "--force" in err
    assert (key.read_bytes(), public.read_bytes()) == first

    key.chmod(0o644)  # a replaced key is a new file: the old, wider mode does not survive
    assert main(["flower", "keygen", str(key), "--force"]) == 0
    assert key.read_bytes() != first[0] and _mode(key) == 0o600


@pytest.mark.parametrize("target_exists", [True, False])
def test_keygen_never_writes_through_a_symbolic_link(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], target_exists: bool) -> None:
    """A link where the key goes would put the private key wherever it points."""
    target = tmp_path / "elsewhere"
    if target_exists:
        target.write_text("someone's file")
    link = tmp_path / "auth-key"
    link.symlink_to(target)
    for force in ([], ["--force"]):
        assert main(["flower", "keygen", str(link), *force]) == 2
        assert f"{link} is a symbolic link" in capsys.readouterr().err
    assert link.is_symlink() and not link.with_name("auth-key.pub").exists()
    if target_exists:
        assert target.read_text() == "someone's file"
    else:
        assert not target.exists()


def _certs(tmp_path: Path, *extra: str) -> list[str]:
    return ["flower", "certs", str(tmp_path / "tls"), "--host", "127.0.0.1", *extra]


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _days_left(cert: x509.Certificate) -> float:
    now = datetime.datetime.now(datetime.UTC)
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


def test_renewing_the_superlink_certificate_keeps_the_ca(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tls = tmp_path / "tls"
    assert main(_certs(tmp_path)) == 0
    ca, ca_key, old = (tls / "ca.crt").read_bytes(), (tls / "ca.key").read_bytes(), \
        (tls / "superlink.crt").read_bytes()
    assert CA_VALID_DAYS - 1 < _days_left(_load(tls / "ca.crt")) <= CA_VALID_DAYS
    capsys.readouterr()

    assert main(_certs(tmp_path, "--host", "superlink.example.org", "--renew")) == 0
    assert "restart the SuperLink" in capsys.readouterr().out
    assert (tls / "ca.crt").read_bytes() == ca and (tls / "ca.key").read_bytes() == ca_key
    assert (tls / "superlink.crt").read_bytes() != old
    cert = _load(tls / "superlink.crt")
    cert.verify_directly_issued_by(_load(tls / "ca.crt"))  # nodes' ca.crt still vouches for it
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert SERVER_VALID_DAYS - 1 < _days_left(cert) <= SERVER_VALID_DAYS
    assert _mode(tls / "superlink.key") == 0o600
    key = serialization.load_pem_private_key((tls / "superlink.key").read_bytes(), None)
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)


def test_certs_refuses_to_replace_a_ca_and_says_how_to_renew(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tls = tmp_path / "tls"
    assert main(_certs(tmp_path)) == 0
    files = {p.name: p.read_bytes() for p in tls.iterdir()}
    capsys.readouterr()
    assert main(_certs(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{tls / 'ca.crt'}" in err and "--renew" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == files


def test_renewing_needs_the_ca_it_renews_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tls = tmp_path / "tls"
    assert main(_certs(tmp_path, "--renew")) == 2
    assert f"cannot renew: {tls / 'ca.crt'} not found" in capsys.readouterr().err
    assert not tls.exists()

    assert main(_certs(tmp_path)) == 0
    other = tmp_path / "other"
    assert main(["flower", "certs", str(other), "--host", "h"]) == 0
    (tls / "ca.key").unlink()
    (tls / "ca.key").write_bytes((other / "ca.key").read_bytes())  # a key of another CA
    old = (tls / "superlink.crt").read_bytes()
    capsys.readouterr()
    assert main(_certs(tmp_path, "--renew")) == 2
    assert f"{tls / 'ca.key'} is not the key of {tls / 'ca.crt'}" in capsys.readouterr().err
    assert (tls / "superlink.crt").read_bytes() == old


def test_certs_never_writes_a_key_through_a_symbolic_link(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "ca.key").symlink_to(tmp_path / "stolen")
    assert main(_certs(tmp_path, "--force")) == 2
    assert f"{tls / 'ca.key'} is a symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "stolen").exists() and sorted(os.listdir(tls)) == ["ca.key"]


def test_renew_and_force_exclude_each_other(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(_certs(tmp_path, "--renew", "--force"))
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "tls").exists()


# -- item 6: the node worker's handshake -----------------------------------------------


@pytest.fixture
def worker_dir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real node worker (``python -m fedbits.runtime.flower.worker``) serving a node
    directory (a shared-source demo node's), its log; stopped by PID at the end."""
    root = tmp_path / "node"
    root.mkdir()
    NodeSettings(0, None, root, worker=True).write()
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedbits.runtime.flower.worker",
                                 str(root)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (root / worker.PID).is_file():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield root, log
    finally:
        proc.terminate()
        proc.wait(30)


def _ask(root: Path) -> tuple[NodeReply, float]:
    """A ClientApp's request to the worker (one it answers at once: a bad run config),
    and how long the answer took."""
    start = time.monotonic()
    reply = worker.call(root, "prepare", "not = [toml", 0, Request("store-1"))
    return reply, time.monotonic() - start


def _answered(reply: NodeReply) -> bool:
    """The worker itself answered (its session could not parse the config)."""
    return "fedbits-config" in reply.error and "worker" not in reply.error


def test_a_silent_connection_does_not_block_the_worker(worker_dir: tuple[Path, Path]) -> None:
    root, log = worker_dir
    reply, _ = _ask(root)  # the worker has finished importing and serves
    assert _answered(reply), reply.error

    silent = socket.socket(socket.AF_UNIX)
    silent.connect(str(root / worker.SOCKET))  # connects, then says nothing
    answers: list[tuple[NodeReply, float]] = []
    asking = threading.Thread(target=lambda: answers.append(_ask(root)), daemon=True)
    asking.start()
    asking.join(worker.HANDSHAKE_TIMEOUT_S + 60)
    assert answers, f"the worker is still waiting on the silent connection:\n{log.read_text()}"
    reply, seconds = answers[0]
    assert _answered(reply), reply.error
    # it was the silent connection's turn first: the real client waited out its timeout
    assert seconds >= worker.HANDSHAKE_TIMEOUT_S - 0.5

    silent.settimeout(10)  # the worker sent its challenge, then hung up
    received = b""
    while chunk := silent.recv(4096):
        received += chunk
    assert b"#CHALLENGE#" in received
    silent.close()
    assert "did not complete the handshake within" in log.read_text()


def test_a_client_without_the_key_is_refused_and_the_worker_goes_on(
        worker_dir: tuple[Path, Path]) -> None:
    root, log = worker_dir
    with pytest.raises(AuthenticationError):
        Client(str(root / worker.SOCKET), family="AF_UNIX", authkey=b"not the key")
    reply, _ = _ask(root)
    assert _answered(reply), reply.error
    assert "refused a connection: AuthenticationError" in log.read_text()
