"""Starting Flower's long-running processes the way a fedbits deployment needs them.

``fedbits flower superlink`` becomes ``flower-superlink`` (same PID) with its state
in one directory (a SQLite database, so registered SuperNode keys survive a
restart), runtime dependency installation off (it would otherwise ``uv sync`` the
app and pull a CUDA build of torch), and either TLS from a certificate directory or
an explicit ``--insecure``. It also fixes the runs directory: the ServerApps it
starts inherit :data:`RUNS_DIR_ENV` and write every run there (:func:`runs_root`),
whatever the submitted config says.

``fedbits flower supernode`` supervises two processes for one data holder:
``flower-supernode`` (its node config, :class:`~.holder.NodeSettings`, says which client
the holder is, where its data is, what it accepts and where the node directory is)
and the node worker that keeps the model in memory between rounds. A worker that
dies is restarted (the round it was serving is reported to the server as missing);
if the SuperNode exits (e.g. refused by the SuperLink), the worker is stopped and
its exit status is returned. SIGTERM or Ctrl-C stops both, and everything the
SuperNode started, by process group. With trusted entities, the ClientApps it
starts run only apps signed by a trusted key (:mod:`.signing`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import NoReturn

from fedbits.errors import FedbitsError
from fedbits.runtime.flower.certs import CertPaths
from fedbits.runtime.flower.holder import NodeSettings
from fedbits.runtime.flower.identity import HOLDERS_ENV, HOLDERS_FILE
from fedbits.runtime.flower.launch import flower_tool
from fedbits.runtime.flower.signing import TRUSTED_ENV, install_verifier

logger = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
MAX_RESTARTS_PER_MINUTE = 5
RUNS_DIR_ENV = "FEDBITS_RUNS_DIR"
"""The SuperLink host's runs directory, handed to the ServerApps it starts."""


def runs_root() -> Path:
    """Where this SuperLink host writes runs: :data:`RUNS_DIR_ENV` (set by
    ``fedbits flower superlink --runs-dir``), else ``~/.fedbits/superlink/runs`` (a
    plain ``flower-superlink``). Either way the host decides, never a submitted run."""
    value = os.environ.get(RUNS_DIR_ENV)
    if not value:
        return Path.home() / ".fedbits" / "superlink" / "runs"
    path = Path(value)
    if not path.is_absolute():
        raise FedbitsError(f"{RUNS_DIR_ENV}={value!r} is not an absolute path: the SuperLink "
                           "host's runs directory must not depend on where a ServerApp starts")
    return path


def quiet_progress_bars() -> None:
    """No library progress bars in a ServerApp's or worker's log (as ``fedbits`` does
    whenever its output is not a terminal): they are never watched live."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _flower_env(flwr_home: Path) -> dict[str, str]:
    """Flower starts its helpers (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``) by name from PATH: this environment's bin comes first, so they
    are found, and are this Flower, also when the virtual environment is not activated."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)  # where Flower installs app bundles for this process
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def superlink_command(state_dir: Path, host: str, port: int, certs: Path | None,
                      insecure: bool, supernode_auth: bool) -> list[str]:
    """The ``flower-superlink`` command line for these choices (checked first)."""
    if insecure == (certs is not None):
        raise FedbitsError("give a certificate directory (--certs, from `fedbits flower certs`) "
                           "or --insecure, not both and not neither")
    if supernode_auth and insecure:
        raise FedbitsError("SuperNode authentication needs TLS: use --certs, not --insecure")
    argv = [flower_tool("flower-superlink"), "--host", host, "--port", str(port),
            "--database", str(state_dir / "state.db"), "--disable-runtime-dependency-installation"]
    if certs is None:
        argv.append("--insecure")
    else:
        paths = CertPaths.in_dir(certs)
        paths.check()
        argv += ["--ssl-ca-certfile", str(paths.ca_cert), "--ssl-certfile", str(paths.server_cert),
                 "--ssl-keyfile", str(paths.server_key)]
    if supernode_auth:
        argv.append("--enable-supernode-auth")
    return argv


def exec_superlink(state_dir: Path, host: str, port: int, certs: Path | None, insecure: bool,
                   supernode_auth: bool, runs_dir: Path) -> NoReturn:
    """Replace this process with the SuperLink, so signals and the PID are its own; its
    ServerApps write runs under ``runs_dir``. With SuperNode authentication they keep
    the data holders' bindings to node keys in ``state_dir`` for every run
    (:mod:`.identity`): registered keys are lasting identities."""
    argv = superlink_command(state_dir, host, port, certs, insecure, supernode_auth)
    program = shutil.which(argv[0])
    if program is None:
        raise FedbitsError(f"{argv[0]} not found: install Flower (pip install 'flwr==1.41.*')")
    runs_dir = runs_dir.expanduser().resolve()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedbitsError(f"cannot create the SuperLink's directories: {e}") from None
    env = _flower_env(state_dir / "flwr-home")
    env[RUNS_DIR_ENV] = str(runs_dir)
    if supernode_auth:
        env[HOLDERS_ENV] = str(state_dir.resolve() / HOLDERS_FILE)
    logger.info("fedbits: runs are written under %s", runs_dir)
    logger.info("fedbits: starting %s", " ".join(argv))
    os.execve(program, argv, env)


class SuperNodeSupervisor:
    """Runs ``flower-supernode`` and the node worker for one data holder; see the module doc."""

    def __init__(self, *, superlink: str, settings: NodeSettings, runtime_port: int,
                 root_certificates: Path | None, insecure: bool,
                 auth_key: Path | None, trusted_entities: Path | None = None) -> None:
        if insecure == (root_certificates is not None):
            raise FedbitsError("give the SuperLink's CA certificate (--root-certificates) or "
                               "--insecure, not both and not neither")
        if auth_key is not None and insecure:
            raise FedbitsError("SuperNode authentication (--auth-key) needs TLS, not --insecure")
        for path in (root_certificates, auth_key, trusted_entities):
            if path is not None and not path.is_file():
                raise FedbitsError(f"{path} not found")
        self.root = settings.root
        self.use_worker = settings.worker
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = _flower_env(self.root / "flwr-home")
        if trusted_entities is not None:
            # not flower-supernode's own --trusted-entities: it refuses every app not
            # fetched from Flower Hub (:mod:`.signing`); the ClientApps its SuperExec
            # starts are fedbits' verifying flwr-clientapp instead
            verifier = install_verifier(self.root, trusted_entities)
            self.env["PATH"] = os.pathsep.join([str(verifier), self.env["PATH"]])
            self.env[TRUSTED_ENV] = str(trusted_entities.resolve())
        # the SuperNode's SuperExec looks for a new message to start a ClientApp for every
        # second by default; every round waits for that, so look twice as often (~1% CPU)
        self.env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
        self.argv = [flower_tool("flower-supernode"), "--superlink", superlink,
                     "--port", str(runtime_port), "--node-config", str(settings.write())]
        self.argv += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
        if auth_key is not None:
            self.argv += ["--auth-supernode-private-key", str(auth_key)]
        self._stop = False

    def _start_worker(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "fedbits.runtime.flower.worker", str(self.root)]
        return subprocess.Popen(argv, env=self.env, start_new_session=True)

    def _request_stop(self, signum: int, _frame: object) -> None:
        self._stop = True

    def run(self) -> int:
        """Supervise until stopped (returns 0) or the SuperNode exits (returns its status)."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        worker = self._start_worker() if self.use_worker else None
        supernode = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        (self.root / "supernode.pid").write_text(f"{supernode.pid}\n")
        restarts: deque[float] = deque(maxlen=MAX_RESTARTS_PER_MINUTE)
        status = 0
        try:
            while not self._stop:
                if (code := supernode.poll()) is not None:
                    logger.warning("flower-supernode exited with status %d", code)
                    status = code or 1
                    break
                if worker is not None and (code := worker.poll()) is not None:
                    now = time.monotonic()
                    if len(restarts) == restarts.maxlen and now - restarts[0] < 60:
                        logger.error("the node worker died %d times within a minute; giving up",
                                     len(restarts))
                        status = 1
                        break
                    restarts.append(now)
                    logger.warning("the node worker (pid %d) exited with status %d; restarting it",
                                   worker.pid, code)
                    worker = self._start_worker()
                time.sleep(0.2)
        finally:
            _stop(supernode, group=True)
            if worker is not None:
                _stop(worker, group=True)
        return status


def _stop(proc: subprocess.Popen[bytes], group: bool) -> None:
    """SIGTERM, wait, then SIGKILL the process (and its process group if ``group``)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what it started: SuperExec, ClientApps
        except (ProcessLookupError, PermissionError):
            pass
