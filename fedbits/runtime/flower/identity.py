"""Which node key is which data holder: bound on first contact, never taken over.

A data holder (client N: a node's ``client-id``, or ``partition-id`` in the demo) is
bound to the public key of the first SuperNode that claims it. A later node with
another key claiming it is refused: the server logs it, never sends it a round and
ignores anything it sends (:class:`~.server_app.NodeDirectory`). Flower gives every
SuperNode a key: the one its operator registered (``--auth-supernode-private-key``
with ``--enable-supernode-auth``) or, without authentication, a new one at every start.

The bindings are a JSON file (:class:`Holders`) in one of two places
(:func:`holders_path`):

- the SuperLink host's, ``<--dir>/holders.json``, when ``fedbits flower superlink
  --enable-supernode-auth`` started it (:data:`HOLDERS_ENV`): registered keys are
  lasting identities, so a binding holds for every run, and the host's operator can
  bind a key ahead of first contact or release a binding (``fedbits flower holders``);
- else the run's own, ``<run dir>/holders.json``: a node that registered itself has a
  new key at every start, so its binding lasts for the run and its resumes.

A change is made under a lock on the file's directory and written whole, so
ServerApps running at the same time agree.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from fedbits.errors import FedbitsError

HOLDERS_FILE = "holders.json"
HOLDERS_ENV = "FEDBITS_HOLDERS"
"""The SuperLink host's lasting bindings file, handed to the ServerApps it starts."""


def holders_path(run_dir: Path) -> Path:
    """Where a run's ServerApp keeps the bindings: the host's file (:data:`HOLDERS_ENV`),
    else the run directory's."""
    value = os.environ.get(HOLDERS_ENV)
    if not value:
        return run_dir / HOLDERS_FILE
    path = Path(value)
    if not path.is_absolute():
        raise FedbitsError(f"{HOLDERS_ENV}={value!r} is not an absolute path")
    return path


def _der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(public_key: bytes) -> str:
    """``sha256:<hex>`` of a public key as DER SubjectPublicKeyInfo, whatever encoding
    Flower reports it in (PEM), so one key always has one fingerprint; bytes that hold
    no PEM key are hashed as they are."""
    try:
        der = _der(serialization.load_pem_public_key(public_key))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        der = public_key
    return f"sha256:{hashlib.sha256(der).hexdigest()}"


def public_key_file_fingerprint(path: Path) -> str:
    """The fingerprint of a node's public key file (OpenSSH, as ``fedbits flower
    keygen`` writes it and ``flwr supernode register`` reads it, or PEM)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FedbitsError(f"cannot read public key {path}: {e.strerror or e}") from None
    try:
        key = (serialization.load_pem_public_key(data) if data.startswith(b"-----")
               else serialization.load_ssh_public_key(data))
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise FedbitsError(f"{path} is not a public key: {e}") from None
    return f"sha256:{hashlib.sha256(_der(key)).hexdigest()}"


@dataclass(frozen=True)
class Binding:
    """A data holder's node key, the node ID it was last seen with, and since when."""

    key: str
    node: int
    since: str


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Holders:
    """Data holder -> node key bindings in a JSON file; see the module doc."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[int, Binding]:
        """Every binding (none when the file does not exist yet)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise FedbitsError(f"cannot read the data holders' bindings {self.path}: "
                               f"{e.strerror or e}") from None
        try:
            entries = json.loads(text)["holders"]
            return {int(holder): Binding(str(b["key"]), int(b["node"]), str(b["since"]))
                    for holder, b in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FedbitsError(f"the data holders' bindings {self.path} are damaged "
                               f"({type(e).__name__}: {e}); fix or remove the file") from None

    @contextmanager
    def _locked(self) -> Iterator[dict[int, Binding]]:
        """The bindings, under an exclusive lock on the file's directory; what the block
        leaves in the dict is written back (atomically) if it changed."""
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            bindings = self.read()
            before = dict(bindings)
            yield bindings
            if bindings != before:
                self._write(bindings)
        finally:
            os.close(fd)  # releases the lock

    def _write(self, bindings: dict[int, Binding]) -> None:
        text = json.dumps({"holders": {str(h): asdict(b) for h, b in sorted(bindings.items())}},
                          indent=2) + "\n"
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=".holders-",
                                         delete=False) as tmp:
            tmp.write(text)
        os.replace(tmp.name, self.path)

    def claim(self, holder: int, key: str, node: int) -> Binding | None:
        """Node ``node`` with ``key`` claims data holder ``holder``: bound to that key on
        first contact, its node ID noted on a later one; ``None`` when the claim holds,
        else the binding that refuses it (another key's)."""
        with self._locked() as bindings:
            current = bindings.get(holder)
            if current is not None and current.key != key:
                return current
            if current is None or current.node != node:
                bindings[holder] = Binding(key, node, current.since if current else _now())
            return None

    def bind(self, holder: int, key: str) -> Binding | None:
        """The operator binds ``holder`` to ``key`` (ahead of first contact, or to a data
        holder's new key); returns the binding it replaces, if any."""
        with self._locked() as bindings:
            old = bindings.get(holder)
            if old is None or old.key != key:
                bindings[holder] = Binding(key, 0, _now())
            return old

    def release(self, holder: int) -> Binding | None:
        """Forget ``holder``'s binding (the next node to claim it is bound); returns it."""
        with self._locked() as bindings:
            return bindings.pop(holder, None)
