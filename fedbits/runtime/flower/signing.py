"""Operator-signed apps: a SuperNode runs only Flower Apps its operator's key signed.

Whoever reaches the SuperLink's Control API can submit an app, and an app is code
that every SuperNode runs. Flower 1.41's own defence, ``flower-supernode
--trusted-entities``, checks signatures that only Flower Hub supplies: the SuperLink
attaches verifications to a FAB fetched from the Hub (``_get_remote_fab`` and
``_format_verification`` in ``flwr/superlink/servicer/control/control_handlers.py``)
and to none submitted from disk (``flwr run DIR`` sends ``Fab(hash, bytes, {})``,
``flwr/cli/run/run.py``), and a SuperNode given trusted entities refuses every FAB
without verifications ("App verification is not supported by the connected
SuperLink", ``_pull_and_store_message`` in ``flwr/supernode/start_client_internal.py``).
So that flag would refuse fedbits' own runs; fedbits signs and checks itself, with
Flower's signature scheme and Flower's trusted-entities file format:

- the operator makes an Ed25519 key (:func:`make_signing_key`, ``fedbits flower
  signing-key``) and gives the data holders its trusted-entities file;
- ``fedbits run`` (with :data:`SIGNING_KEY_ENV` set) builds the FAB exactly as ``flwr
  run`` will (``build_fab_from_disk``: fixed timestamps, so the same bytes), signs its
  SHA-256 (Flower's ``create_message_to_sign``) and submits the signature as the run
  config override :data:`SIGNATURE_KEY` (:func:`sign_app`);
- ``fedbits flower supernode --trusted-entities FILE`` puts a ``flwr-clientapp`` of
  fedbits' first on the PATH its SuperExec starts ClientApps from
  (:func:`install_verifier`). It is Flower's own ``flwr-clientapp`` with one step
  added: after pulling the message, run and FAB from the SuperNode and before
  unpacking or importing anything of the FAB, :func:`verify` checks the signature
  against the trusted keys, and that the run overrides nothing but the signature
  (a signed app is run as signed, not with another config). An unsigned, tampered or
  foreign-signed app gets an error reply naming why and none of its code runs on the
  node; the SuperNode goes on serving other runs. The step wraps Flower 1.41's
  ``pull_task_input`` and ``install_from_fab`` in
  ``flwr/supernode/runtime/run_clientapp.py``; the real-SuperLink test checks it.

A signature is ``KEY_ID.SIGNED_AT.SIGNATURE`` (base64url). A signed app can be
submitted again by whoever reaches the Control API: it then runs the operator's app
with the operator's config once more, never other code.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedbits.errors import FedbitsError
from fedbits.runtime.flower.keyfiles import check_new, write_new

logger = logging.getLogger(__name__)

SIGNATURE_KEY = "fedbits-signature"
"""The run config key that carries the operator's signature of the FAB."""
SIGNING_KEY_ENV = "FEDBITS_APP_SIGNING_KEY"
"""The operator's private signing key: ``fedbits run`` signs every app it submits."""
TRUSTED_ENV = "FEDBITS_TRUSTED_ENTITIES"
"""The trusted-entities file the node's ``flwr-clientapp`` checks apps against."""
TRUSTED_SUFFIX = ".trusted-entities.yaml"


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    """A signing key's ID in a trusted-entities file: a digest of the key itself, so
    two keys never share an ID."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"fedbits-{hashlib.sha256(raw).hexdigest()[:16]}"


def signing_key_files(private: Path) -> tuple[Path, Path]:
    """The public key file and trusted-entities file that go with ``private``."""
    return Path(f"{private}.pub"), Path(f"{private}{TRUSTED_SUFFIX}")


def make_signing_key(private: Path, *, force: bool = False) -> tuple[Path, Path]:
    """An Ed25519 app-signing key pair in OpenSSH format (what Flower's own signing
    reads): ``private`` (0600, stays with the operator), ``private.pub`` and
    ``private.trusted-entities.yaml`` (for the data holders). Existing files are refused
    unless ``force``. Returns the public key and trusted-entities paths."""
    public_path, trusted_path = signing_key_files(private)
    check_new([private, public_path, trusted_path], replace=force,
              hint="pass --force to replace them (every node must then get the new "
              "trusted-entities file)")
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    write_new(private, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()),
              private=True, replace=force)
    write_new(public_path, f"{public}\n".encode(), private=False, replace=force)
    trusted = yaml.safe_dump({key_id(key.public_key()): public})
    write_new(trusted_path, trusted.encode(), private=False, replace=force)
    return public_path, trusted_path


def _load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, UnsupportedAlgorithm) as e:
        raise FedbitsError(f"app signing key {path} ({SIGNING_KEY_ENV}): cannot read it "
                           f"({e}); make one with `fedbits flower signing-key`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FedbitsError(f"app signing key {path} ({SIGNING_KEY_ENV}) is not an Ed25519 "
                           "key; make one with `fedbits flower signing-key`")
    return key


def load_trusted_entities(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """The keys in a trusted-entities file (Flower's format: a YAML mapping of key IDs to
    ``ssh-ed25519 ...`` public keys); refused, naming the file, if it holds none or
    anything else."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise FedbitsError(f"--trusted-entities {path}: cannot read it ({e})") from None
    if not isinstance(data, dict) or not data:
        raise FedbitsError(f"--trusted-entities {path}: not a YAML mapping of key IDs to "
                           "public keys (`fedbits flower signing-key` writes one)")
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for name, text in data.items():
        try:
            key = serialization.load_ssh_public_key(str(text).encode())
        except (ValueError, UnsupportedAlgorithm):
            key = None
        if not isinstance(name, str) or not isinstance(key, ed25519.Ed25519PublicKey):
            raise FedbitsError(f"--trusted-entities {path}: entry {name!r} is not an "
                               "'ssh-ed25519 ...' public key")
        keys[name] = key
    return keys


def _message(fab: bytes, signed_at: int) -> bytes:
    """What is signed: Flower's canonical message (``create_message_to_sign``), the
    timestamp then the FAB's SHA-256, so a fedbits key also verifies the Flower way."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    return create_message_to_sign(hashlib.sha256(fab).digest(), signed_at)


def sign_fab(fab: bytes, private: Path) -> str:
    """The signature of ``fab`` with the key in ``private``: ``KEY_ID.SIGNED_AT.SIG``."""
    key = _load_private_key(private)
    signed_at = int(time.time())
    signature = base64.urlsafe_b64encode(key.sign(_message(fab, signed_at))).rstrip(b"=")
    return f"{key_id(key.public_key())}.{signed_at}.{signature.decode()}"


def sign_app(app: Path, private: Path) -> str:
    """Sign the FAB ``flwr run APP`` will submit (built here the same way: Flower's
    ``build_fab_from_disk`` writes fixed timestamps, so the bytes are the same)."""
    from flwr.cli.build import build_fab_from_disk

    return sign_fab(build_fab_from_disk(app), private)


def signature_override(signature: str) -> list[str]:
    """The ``flwr run`` arguments that submit ``signature`` with the app."""
    return ["--run-config", f'{SIGNATURE_KEY}="{signature}"']


def verify(fab: bytes, overrides: dict[str, Any],
           trusted: dict[str, ed25519.Ed25519PublicKey]) -> str:
    """Check that ``fab`` is signed by a trusted key and that the run's config
    ``overrides`` are the signature alone; return the key ID, else raise why not."""
    signature = overrides.get(SIGNATURE_KEY)
    if not isinstance(signature, str) or not signature:
        raise FedbitsError("this node runs only apps signed by a key in its "
                           f"--trusted-entities, and this run carries no {SIGNATURE_KEY}: "
                           "refused, none of its code was loaded")
    others = sorted(set(overrides) - {SIGNATURE_KEY})
    if others:
        raise FedbitsError(f"the run overrides the signed app's config ({', '.join(others)}): "
                           "refused; a signed app runs only as it was signed")
    name, _, rest = signature.partition(".")
    stamp, _, encoded = rest.partition(".")
    key = trusted.get(name)
    if key is None:
        raise FedbitsError(f"the app is signed by key {name!r}, which is not in this node's "
                           "--trusted-entities: refused, none of its code was loaded")
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        key.verify(raw, _message(fab, int(stamp)))
    except (InvalidSignature, ValueError, OverflowError):  # wrong or malformed
        raise FedbitsError(f"the app's signature by {name!r} does not match its bundle "
                           "(changed after signing, or forged): refused, none of its code "
                           "was loaded") from None
    return name


def install_verifier(root: Path, trusted: Path) -> Path:
    """Write ``ROOT/bin/flwr-clientapp``, which runs :func:`clientapp_main` in this Python
    (replaced at every start: it names this interpreter); return ``ROOT/bin`` for the
    front of the SuperNode's PATH. The trusted keys are checked now, so a bad file
    stops the node before it connects."""
    load_trusted_entities(trusted)
    script = root / "bin" / "flwr-clientapp"
    # imported, not run with -m: as __main__ its records would miss fedbits' log handler
    code = "from fedbits.runtime.flower.signing import clientapp_main; clientapp_main()"
    text = f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n'
    write_new(script, text.encode(), private=True, replace=True)
    script.chmod(0o700)
    return script.parent


def clientapp_main() -> None:
    """Flower's ``flwr-clientapp``, with :func:`verify` run on the FAB's bytes as Flower
    is about to unpack them (its ``install_from_fab``, the first step after the task's
    message, context, run and FAB are pulled from the SuperNode). A refused app's code
    is never unpacked or imported, and since the message is in hand by then, Flower
    replies to it with the reason (a refusal while pulling would leave it unanswered)."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    from fedbits.logs import configure

    configure()  # this process's output is the SuperNode's log
    trusted_file = os.environ.get(TRUSTED_ENV)
    pull, install = runtime.pull_task_input, runtime.install_from_fab
    pulled: list[Any] = []  # the task's run: its overrides carry the signature

    def pull_recording(client: Any) -> Any:
        task = pull(client)
        pulled.append(task[2])
        return task

    def install_verified(fab_file: Path | bytes, install_dir: Path | None = None,
                         skip_prompt: bool = False) -> Path:
        run = pulled[-1]
        fab = fab_file if isinstance(fab_file, bytes) else fab_file.read_bytes()
        digest = hashlib.sha256(fab).hexdigest()[:12]
        try:
            if not trusted_file:  # only ever started with it: fail closed
                raise FedbitsError(f"{TRUSTED_ENV} is not set: this flwr-clientapp runs only "
                                   "verified apps")
            name = verify(fab, dict(run.override_config),
                          load_trusted_entities(Path(trusted_file)))
        except FedbitsError as e:
            logger.error("run %d: app %s refused: %s", run.run_id, digest, e)
            raise
        logger.info("run %d: app %s signed by %s", run.run_id, digest, name)
        return install(fab, install_dir, skip_prompt)

    runtime.pull_task_input = pull_recording
    runtime.install_from_fab = install_verified
    sys.argv[0] = "flwr-clientapp"  # Flower names its exit event after argv[0]
    flwr_clientapp()
