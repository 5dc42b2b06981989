"""The node worker: one long-lived process per SuperNode that keeps the model loaded.

Flower 1.41 runs every ClientApp message in a fresh process, in both isolation modes:
``flwr-clientapp`` pulls one task, runs it and exits, whether the SuperNode's own
SuperExec starts it (``--isolation subprocess``) or an external one does
(``--isolation process``). Importing torch and building the model would then cost
every round. So the ClientApp stays thin: it relays the request over a Unix socket
on the same machine to this worker, which holds a :class:`~.node.NodeHost` for the
SuperNode's lifetime. Nothing here crosses the network; Flower carries every byte
between server and node.

The socket lives in the node's fedbits directory (``worker.sock``) and every
connection must prove it knows ``worker.key`` (mode 0600), through the HMAC
handshake of :mod:`multiprocessing.connection`. The worker serves one connection at a
time, so each connection gets :data:`HANDSHAKE_TIMEOUT_S` per read or write (kernel
socket timeouts): a client that connects and stays silent is dropped, not waited on
forever while the ClientApps queue behind it. A lock file keeps a second worker off
the same directory. Each request is two frames, a JSON header and the payload bytes,
and so is each reply; nothing is unpickled.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
import struct
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Client,
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path
from typing import Any

from fedbits.errors import FedbitsError
from fedbits.logs import configure
from fedbits.runtime.flower.holder import NodeSettings
from fedbits.runtime.flower.keyfiles import write_new
from fedbits.runtime.flower.protocol import NodeReply, Request

# run with `python -m`, this module is __main__: its logger is still one of fedbits' own
logger = logging.getLogger("fedbits.runtime.flower.worker")

SOCKET = "worker.sock"
KEY = "worker.key"
LOCK = "worker.lock"
PID = "worker.pid"
CONNECT_WAIT_S = 120.0  # a worker being (re)started imports torch before it listens again
HANDSHAKE_TIMEOUT_S = 5.0
"""How long the worker waits on a connection's next read or write (a local ClientApp
answers in microseconds); past it the connection is dropped."""
_MAX_SOCKET_PATH = 107  # sun_path on Linux, minus the terminating NUL


def _socket_path(root: Path) -> str:
    path = str(root.resolve() / SOCKET)
    if len(path.encode()) > _MAX_SOCKET_PATH:
        raise FedbitsError(
            f"the worker socket path {path} is {len(path.encode())} bytes, over the "
            f"{_MAX_SOCKET_PATH}-byte limit of Unix sockets: choose a shorter node directory"
        )
    return path


def _key(root: Path, create: bool) -> bytes:
    """The shared secret; the worker makes it (a new file, 0600) on first start."""
    path = root / KEY
    if create and not path.exists():
        write_new(path, secrets.token_bytes(32), private=True)
    return path.read_bytes()


def _send(conn: Connection, header: dict[str, Any], blob: bytes) -> None:
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(blob)


def _recv(conn: Connection) -> tuple[dict[str, Any], bytes]:
    header = json.loads(conn.recv_bytes().decode())
    return header, conn.recv_bytes()


# -- the ClientApp's side ----------------------------------------------------------
def call(root: Path, op: str, config_text: str, partition: int, request: Request) -> NodeReply:
    """Ask this node's worker; a worker that dies mid-request yields an error reply
    (for ``partition``, the node's; the worker answers from the node config it read).

    A missing or refusing socket is retried for :data:`CONNECT_WAIT_S` (the
    supervisor restarts a dead worker); a connection that breaks after it was made
    means the worker died while holding this request.
    """
    address = _socket_path(root)
    header = {"op": op, "config": config_text, "store": request.store, "round": request.round,
              "client": request.client, "committed": request.committed}
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        try:
            conn = Client(address, family="AF_UNIX", authkey=_key(root, create=False))
            break
        except (FileNotFoundError, ConnectionRefusedError) as e:  # not (yet, again) listening
            if time.monotonic() > deadline:
                return NodeReply(
                    error=f"no fedbits worker answers at {address} ({type(e).__name__}) after "
                    f"{CONNECT_WAIT_S:.0f}s: is `fedbits flower supernode` running for {root}?",
                    partition=partition)
            time.sleep(0.2)
        except AuthenticationError:
            return NodeReply(error=f"the fedbits worker at {address} refused this ClientApp's "
                             f"key ({root / KEY} changed while it ran?)", partition=partition)
        except (EOFError, OSError) as e:  # it accepted, then vanished during the handshake
            return _died(address, e, partition)
    with conn:
        try:
            _send(conn, header, request.blob)
            reply, blob = _recv(conn)
        except (EOFError, OSError) as e:
            return _died(address, e, partition)
    return NodeReply(blob=blob if reply["has_blob"] else None, error=reply["error"],
                     partition=partition, stats=reply["stats"], info=reply["info"],
                     truncated=reply["truncated"])


def _died(address: str, e: BaseException, partition: int) -> NodeReply:
    return NodeReply(error=f"the fedbits worker at {address} died while serving this request "
                     f"({type(e).__name__})", partition=partition)


# -- the worker ----------------------------------------------------------------------
def _set_timeouts(conn: Connection, seconds: float) -> None:
    """Make every blocking read and write on ``conn`` fail (``BlockingIOError``) after
    ``seconds`` without progress: ``SO_RCVTIMEO``/``SO_SNDTIMEO`` on its socket, which
    :class:`Connection`'s plain ``os.read``/``os.write`` calls respect."""
    timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:  # the same socket, a new fd
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def accept(listener: Listener, key: bytes) -> Connection | None:
    """The next connection, once it has passed the HMAC handshake of
    :mod:`multiprocessing.connection` (what ``Listener(authkey=...)`` does, but with
    :data:`HANDSHAKE_TIMEOUT_S` per step); ``None`` after dropping one that failed it,
    stayed silent or went away."""
    conn = listener.accept()  # a Listener without authkey: returns once a client connects
    try:
        _set_timeouts(conn, HANDSHAKE_TIMEOUT_S)
        deliver_challenge(conn, key)
        answer_challenge(conn, key)
    except BlockingIOError:
        logger.warning("dropped a connection that did not complete the handshake within "
                       "%gs", HANDSHAKE_TIMEOUT_S)
    except (AuthenticationError, AssertionError, EOFError, OSError) as e:
        logger.warning("refused a connection: %s: %s", type(e).__name__, e)
    else:
        return conn
    conn.close()
    return None


def _request(conn: Connection) -> tuple[str, str, Request]:
    """The operation, config text and request an authenticated client sent."""
    header, blob = _recv(conn)
    try:
        return (str(header["op"]), str(header["config"]),
                Request(str(header["store"]), int(header["round"]), int(header["client"]),
                        int(header["committed"]), blob))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad request header: {type(e).__name__}: {e}") from None


def serve(root: Path) -> None:
    """Listen on ``root``'s socket and answer requests, one at a time, until killed. The
    data holder's settings (its data, its pins) are the node config in ``root``, read
    once: what a request carries never changes them."""
    settings = NodeSettings.load(root)
    lock = open(root / LOCK, "w")  # held (open) for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FedbitsError(f"another fedbits worker already serves {root}") from None
    address = _socket_path(root)
    if os.path.exists(address):  # left behind by a worker that was killed
        os.unlink(address)
    key = _key(root, create=True)
    listener = Listener(address, family="AF_UNIX")  # the handshake is accept()'s, with timeouts
    (root / PID).write_text(f"{os.getpid()}\n")
    logger.info("listening on %s", address)

    from fedbits.runtime.flower.node import NodeHost  # torch: after the socket is up
    from fedbits.runtime.flower.processes import quiet_progress_bars

    quiet_progress_bars()
    host = NodeHost(settings)
    while True:
        conn = accept(listener, key)
        if conn is None:
            continue
        with conn:
            try:
                op, config_text, request = _request(conn)
            except (EOFError, OSError, ValueError) as e:
                logger.warning("dropped a malformed request: %s", type(e).__name__)
                continue
            reply = host.handle(op, config_text, request)
            if reply.error:
                logger.info("%s failed: %s", op, reply.error)
            try:
                _send(conn, {"has_blob": reply.blob is not None, "error": reply.error,
                             "stats": reply.stats, "info": reply.info,
                             "truncated": reply.truncated}, reply.blob or b"")
            except OSError as e:  # the ClientApp went away; the SuperNode reports it
                logger.warning("could not deliver the reply: %s", type(e).__name__)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fedbits.runtime.flower.worker NODE_DIR")
    configure(prefix=f"[fedbits worker {os.getpid()}] ")  # its output is the SuperNode's log
    try:
        serve(Path(sys.argv[1]))
    except FedbitsError as e:
        sys.exit(f"fedbits worker: error: {e}")
