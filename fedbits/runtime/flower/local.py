"""A Flower deployment on this machine, for tests, benchmarks and trying things out.

Starts ``fedbits flower superlink`` / ``fedbits flower supernode`` processes on
127.0.0.1, each logging to a file (the SuperLink writes runs under ``tmp/runs``), and
stops every one of them by PID together with everything it started (SuperNodes, node
workers, SuperExec, ClientApps, ServerApps), found before it is stopped, so nothing
outlives the deployment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from fedbits.errors import FedbitsError
from fedbits.runtime.flower.launch import flower_tool

START_TIMEOUT_S = 300.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalProcesses:
    """``fedbits flower`` processes started from ``tmp`` (logs, state and ``FLWR_HOME``).

    Runs submitted to the SuperLink are written under :attr:`runs_dir` whatever their
    ``run.out_dir``; a run given that ``run.out_dir`` is found there by ``fedbits run``.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_HOME": str(tmp / "cli")}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.runs_dir = tmp / "runs"
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        """``fedbits flower ARGS``, output appended to ``tmp/NAME.log``."""
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([flower_tool("fedbits"), "flower", *args], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def start_superlink(self, *args: str) -> tuple[subprocess.Popen, Path]:
        """The SuperLink on :attr:`port`, state in ``tmp/superlink``, runs in
        :attr:`runs_dir`; returns once it listens."""
        proc, log = self.start("superlink", "superlink", "--dir", str(self.tmp / "superlink"),
                               "--port", str(self.port), "--runs-dir", str(self.runs_dir), *args)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise FedbitsError(f"the SuperLink exited:\n{log.read_text()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return proc, log
            if time.monotonic() > deadline:
                raise FedbitsError(f"the SuperLink is not up after {START_TIMEOUT_S:g} s:\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def start_supernode(
        self, partition: int, tag: str = "", *args: str
    ) -> tuple[subprocess.Popen, Path]:
        """A shared-source demo SuperNode (and its worker) for partition ``partition`` of
        each run's ``data.source``."""
        name = f"node-{partition}{'-' + tag if tag else ''}"
        return self.start_node(name, "--partition-id", str(partition), *args)

    def start_node(self, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        """``fedbits flower supernode ARGS`` (e.g. a data holder's ``--client-id N --data
        PATH`` and pins), its directory ``tmp/NAME``, its log ``tmp/NAME.log``."""
        return self.start(name, "supernode", "--superlink", self.address,
                          "--dir", str(self.tmp / name), "--runtime-port", str(free_port()),
                          *args)

    def stop(self, procs: list[subprocess.Popen] | None = None) -> None:
        """Stop ``procs`` (default: all, the last started first) and their descendants."""
        for proc in list(reversed(self.procs)) if procs is None else procs:
            try:
                family = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for child in family:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            self.procs.remove(proc)
