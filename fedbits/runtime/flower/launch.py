"""``fedbits run`` with ``runtime.kind = "flower"``: submit, follow, collect.

The run is submitted with Flower's own CLI (``flwr run --stream``) to the SuperLink
named by ``runtime.superlink`` (else flwr's default connection), which streams its
log until the ServerApp ends;
then ``flwr ls`` gives the run's status and the SuperLink's count of
the bytes that crossed its Fleet API for this run. Those go to ``flower.json`` in
the run directory next to fedbits' own payload total from the ledger, so Flower's
framing overhead is visible. Without a configured connection nothing starts
(:func:`~fedbits.runtime.flower.app.resolve_connection`): ``flwr`` would otherwise
start a local simulation SuperLink of its own. With ``FEDBITS_APP_SIGNING_KEY`` set, the
app is signed with that key (:mod:`.signing`), so SuperNodes that trust it run it.

The ServerApp writes the run directory on the SuperLink's machine, as ``run.name``
under the runs directory that host chose (``fedbits flower superlink --runs-dir``);
``run.out_dir`` only says where this machine looks for it afterwards. When it is not
there (another machine), copy the directory back (``rsync``) and ``flower.json`` is
written by ``fedbits flower follow`` instead. ``--overwrite`` is refused: a run
submitted to a SuperLink never deletes a directory on its host.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbits.config import Config
from fedbits.errors import ConfigError, FedbitsError
from fedbits.runtime.flower.app import resolve_connection, write_app
from fedbits.runtime.flower.signing import SIGNING_KEY_ENV, sign_app, signature_override

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def flower_tool(name: str) -> str:
    """A Flower executable from this environment (next to this Python), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _flwr(args: list[str]) -> dict[str, Any]:
    """Run a ``flwr ... --format json`` command and return its JSON answer."""
    proc = subprocess.run([flower_tool("flwr"), *args, "--format", "json"],
                          capture_output=True, text=True)
    try:
        out = json.loads(proc.stdout[proc.stdout.find("{"):])
    except ValueError:
        out = {}
    if proc.returncode != 0 or not out.get("success", False):
        detail = out.get("error-message") or _ANSI.sub("", proc.stderr or proc.stdout).strip()
        raise FedbitsError(f"`flwr {' '.join(args)}` failed: {detail}")
    return out


_STARTED = re.compile(r"Successfully started run (\d+)")
_RUN_DIR = re.compile(r"fedbits run directory: (\S.*)$")  # the ServerApp's line


@dataclass
class Streamed:
    """What a streaming ``flwr`` command said: its exit status, the run ID it announced
    (``flwr run``), the run directory the ServerApp reported and its last lines."""

    status: int
    run_id: int | None
    server_dir: str | None
    tail: list[str]


def _stream(argv: list[str]) -> Streamed:
    """Run a streaming ``flwr`` command, relaying each line of its output as an INFO
    record (the ServerApp's progress is in it)."""
    run_id: int | None = None
    server_dir: str | None = None
    tail: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = _ANSI.sub("", raw).rstrip()
                if not line.strip():
                    continue
                if run_id is None and (m := _STARTED.search(line)):
                    run_id = int(m.group(1))
                if server_dir is None and (m := _RUN_DIR.search(line)):
                    server_dir = m.group(1)
                tail = (tail + [line])[-20:]
                logger.info(line)
        except KeyboardInterrupt:
            proc.terminate()
            where = f"run {run_id}" if run_id is not None else "the run"
            raise FedbitsError(
                f"stopped following {where}; it goes on on the SuperLink: "
                "`fedbits flower follow RUN_ID --run-dir DIR` re-attaches, "
                "`flwr stop RUN_ID` stops it"
            ) from None
    return Streamed(proc.returncode, run_id, server_dir, tail)


def launch(cfg: Config, *, resume: bool, overwrite: bool) -> Path:
    """Submit ``cfg`` to its SuperLink, stream the run's log, collect; return the run dir.

    ``overwrite`` is refused before anything starts: the SuperLink host keeps its run
    directories, and only its operator removes one (docs/flower.md).
    """
    if overwrite:
        raise ConfigError(
            f"--overwrite does not apply to a run on Flower: the SuperLink host decides where "
            f"runs go and never deletes one because a submitted run asks. To start "
            f"run.name={cfg.run.name!r} again, have the SuperLink host's operator remove it "
            f"there (`rm -r RUNS_DIR/{cfg.run.name}`, RUNS_DIR being `fedbits flower superlink "
            "--runs-dir`, default ~/.fedbits/superlink/runs) and run without --overwrite, "
            "or choose another run.name")
    superlink = resolve_connection(cfg.runtime.superlink)
    cfg = cfg.model_copy(deep=True)
    cfg.run.out_dir = str(Path(cfg.run.out_dir).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        app = write_app(cfg, Path(tmp), resume=resume)
        argv = [flower_tool("flwr"), "run", str(app), superlink, "--stream"]
        if key := os.environ.get(SIGNING_KEY_ENV):
            argv += signature_override(sign_app(app, Path(key).expanduser()))
            logger.info("the app is signed with %s (%s)", key, SIGNING_KEY_ENV)
        else:
            logger.info("the app is not signed (%s is not set): SuperNodes started with "
                        "--trusted-entities refuse it", SIGNING_KEY_ENV)
        streamed = _stream(argv)
    if streamed.status != 0 or streamed.run_id is None:
        raise FedbitsError(f"`flwr run` could not start the run on SuperLink "
                           f"{superlink!r}:\n" + "\n".join(streamed.tail))
    return collect(streamed.run_id, cfg.run_dir, superlink, streamed.server_dir)


def follow(run_id: int, run_dir: Path, superlink: str | None) -> Path:
    """Stream a submitted run's log until it ends, then :func:`collect`."""
    superlink = resolve_connection(superlink)
    streamed = _stream([flower_tool("flwr"), "log", str(run_id), superlink, "--stream"])
    if streamed.status != 0:
        raise FedbitsError(f"`flwr log {run_id}` failed:\n" + "\n".join(streamed.tail))
    return collect(run_id, run_dir, superlink, streamed.server_dir)


def payload_bytes(run_dir: Path) -> int:
    """fedbits' own count of the payload bytes the run moved (the ledger)."""
    path = run_dir / "ledger.jsonl"
    return sum(json.loads(line)["bytes"] for line in path.read_text().splitlines() if line.strip())


def collect(run_id: int, run_dir: Path, superlink: str | None,
            server_dir: str | None = None) -> Path:
    """Record the Flower run's status and traffic in ``flower.json``; fail if it failed.

    ``flower.json`` lists every Flower run the fedbits run took (a resumed run takes
    more than one) and compares their total traffic with the ledger's payload bytes.
    ``server_dir`` is where the ServerApp said it wrote the run, if its log was seen.
    """
    conn = [superlink] if superlink else []
    runs = _flwr(["ls", *conn, "--run-id", str(run_id)])["runs"]
    if not runs:
        raise FedbitsError(f"the SuperLink knows no run {run_id}")
    info = runs[0]
    status = str(info["status"])
    if status != "finished:completed":
        raise FedbitsError(
            f"Flower run {run_id} ended {status!r} ({info.get('status-details', '')}); "
            f"its log: flwr log {run_id} {superlink or ''} --show".rstrip()
        )
    if not (run_dir / "ledger.jsonl").is_file():
        where = server_dir or "its runs directory"
        logger.info(f"the ServerApp wrote the run to {where} on the SuperLink's machine: copy "
                    f"it to {run_dir}, then `fedbits flower follow {run_id} --run-dir "
                    f"{run_dir}` records Flower's traffic")
        return run_dir
    path = run_dir / "flower.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    # a resumed run is several Flower runs; the ledger covers all of them
    flower_runs = [r for r in record.get("flower_runs", []) if r["run_id"] != run_id]
    flower_runs.append({
        "run_id": run_id,
        "superlink": superlink,
        "status": status,
        "elapsed_seconds": info.get("elapsed"),
        "network_traffic": info["network-traffic"],  # the SuperLink's Fleet API, both ways
        "compute_time": info.get("compute-time"),
    })
    total = sum(int(r["network_traffic"]["total-bytes"]) for r in flower_runs)
    payload = payload_bytes(run_dir)
    record.update(
        flower_runs=flower_runs,
        flower_total_bytes=total,
        fedbits_payload_bytes=payload,  # the ledger: fedbits messages, both directions
        flower_overhead_bytes=total - payload,
    )
    path.write_text(json.dumps(record, indent=2) + "\n")
    logger.info(f"Flower moved {total:,} B for this run; fedbits payloads {payload:,} B; "
                f"framing and control {total - payload:,} B")
    return run_dir
