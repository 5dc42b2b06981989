"""The control plane without processes: signed apps and the SuperLink's address.

A node started with ``--trusted-entities`` runs an app only if :func:`verify` accepts
it, and it checks before Flower unpacks or imports anything of the app
(``clientapp_main`` wraps Flower's ``pull_task_input``; the real-SuperLink test in
``tests/test_flower.py`` shows a foreign app's code never running there). Here: what
``verify`` accepts and refuses, that the signature is over the exact bytes ``flwr
run`` submits, the key files, and the refusals of ``fedbits flower superlink`` and
``supernode`` before anything starts.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import get_fab_config
from flwr.supercore.primitives.asymmetric_ed25519 import (
    create_message_to_sign,
    decode_base64url,
    load_private_key,
    verify_signature,
)
from flwr.supernode.cli.flower_supernode import _validate_public_keys_ed25519

from fedbits.cli import main
from fedbits.errors import FedbitsError
from fedbits.resolve import load_config
from fedbits.runtime.flower import signing
from fedbits.runtime.flower.app import write_app
from fedbits.runtime.flower.signing import (
    SIGNATURE_KEY,
    load_trusted_entities,
    make_signing_key,
    sign_app,
    verify,
)

from conftest import TINY


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return write_app(load_config(TINY, []), tmp_path / "app")


@pytest.fixture
def operator(tmp_path: Path) -> Path:
    key = tmp_path / "keys" / "operator"
    make_signing_key(key)
    return key


def _trusted(key: Path) -> dict:
    return load_trusted_entities(Path(f"{key}.trusted-entities.yaml"))


def test_a_signed_app_verifies_on_the_bytes_flwr_run_submits(app, operator):
    signature = sign_app(app, operator)
    fab = build_fab_from_disk(app)  # what `flwr run APP` builds and the node receives
    assert verify(fab, {SIGNATURE_KEY: signature}, _trusted(operator)) == signature.split(".")[0]
    # the app declares the key, so the SuperLink accepts the override
    assert get_fab_config(fab)["tool"]["flwr"]["app"]["config"][SIGNATURE_KEY] == ""


def test_the_signature_is_flowers_scheme(app, operator):
    """Flower's own ``_verify_fab`` would accept it: the same message, key and encoding."""
    name, signed_at, encoded = sign_app(app, operator).split(".")
    public = load_private_key(operator).public_key()
    message = create_message_to_sign(hashlib.sha256(build_fab_from_disk(app)).digest(),
                                     int(signed_at))
    assert verify_signature(public, message, decode_base64url(encoded))
    entities = yaml.safe_load(Path(f"{operator}.trusted-entities.yaml").read_text())
    _validate_public_keys_ed25519(entities)  # flower-supernode --trusted-entities reads it
    assert list(entities) == [name]


@pytest.mark.parametrize("case, reason", [
    ("unsigned", "carries no fedbits-signature"),
    ("foreign key", "which is not in this node's --trusted-entities"),
    ("changed bundle", "does not match its bundle"),
    ("garbled", "does not match its bundle"),
    ("other overrides", "the run overrides the signed app's config (fedbits-config)"),
])
def test_what_a_node_refuses(app, operator, tmp_path, case, reason):
    fab = build_fab_from_disk(app)
    signature = sign_app(app, operator)
    overrides: dict = {SIGNATURE_KEY: signature}
    if case == "unsigned":
        overrides = {}
    elif case == "foreign key":
        stranger = tmp_path / "keys" / "stranger"
        make_signing_key(stranger)
        overrides = {SIGNATURE_KEY: sign_app(app, stranger)}
    elif case == "changed bundle":
        fab = build_fab_from_disk(write_app(load_config(TINY, ["run.rounds=9"]),
                                            tmp_path / "other"))
    elif case == "garbled":
        overrides = {SIGNATURE_KEY: signature.rsplit(".", 1)[0] + ".!!"}
    else:
        overrides["fedbits-config"] = "[run]\nrounds = 9\n"
    with pytest.raises(FedbitsError) as refused:
        verify(fab, overrides, _trusted(operator))
    assert reason in str(refused.value)


def test_signing_key_files_are_new_and_private(tmp_path, capsys):
    key = tmp_path / "keys" / "operator"
    assert main(["flower", "signing-key", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert Path(f"{key}.pub").read_text().startswith("ssh-ed25519 ")
    assert "--trusted-entities operator.trusted-entities.yaml" in capsys.readouterr().out
    before = key.read_bytes()
    assert main(["flower", "signing-key", str(key)]) == 2
    assert "already exist" in capsys.readouterr().err and key.read_bytes() == before


def test_a_bad_trusted_entities_file_is_refused(tmp_path):
    bad = tmp_path / "trusted.yaml"
    bad.write_text("someone: ecdsa-sha2-nistp384 AAAA\n")
    with pytest.raises(FedbitsError, match="entry 'someone' is not an 'ssh-ed25519"):
        load_trusted_entities(bad)
    bad.write_text("- a list\n")
    with pytest.raises(FedbitsError, match="not a YAML mapping"):
        load_trusted_entities(bad)


def test_the_verifier_is_first_on_the_nodes_path(tmp_path, operator):
    """What the SuperNode's SuperExec finds as ``flwr-clientapp``: fedbits' verifying one,
    a script of the node's user only, naming this Python."""
    bin_dir = signing.install_verifier(tmp_path / "node", Path(f"{operator}.trusted-entities.yaml"))
    script = bin_dir / "flwr-clientapp"
    assert os.access(script, os.X_OK) and stat.S_IMODE(script.stat().st_mode) == 0o700
    assert "from fedbits.runtime.flower.signing import clientapp_main" in script.read_text()
    shown = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: flwr-clientapp"), shown


def test_supernode_refuses_a_bad_trusted_entities_file_before_starting(tmp_path, capsys):
    bad = tmp_path / "trusted.yaml"
    bad.write_text("nothing\n")
    status = main(["flower", "supernode", "--superlink", "127.0.0.1:1", "--partition-id", "0",
                   "--insecure", "--dir", str(tmp_path / "node"), "--trusted-entities", str(bad)])
    assert status == 2
    assert f"--trusted-entities {bad}: not a YAML mapping" in capsys.readouterr().err
    assert not (tmp_path / "node" / "supernode.pid").exists()  # nothing started


def test_superlink_refuses_a_public_host_unless_told(tmp_path, capsys):
    """Flower 1.41 serves its Control API on the Fleet API's address: binding anything but
    loopback hands it out, so it takes ``--expose-control-api``."""
    status = main(["flower", "superlink", "--host", "0.0.0.0", "--insecure",
                   "--dir", str(tmp_path / "superlink")])
    err = capsys.readouterr().err
    assert status == 2 and "--host 0.0.0.0 is refused" in err and "--expose-control-api" in err
    assert not (tmp_path / "superlink").exists()  # nothing started or written


def test_app_sign_prints_what_flwr_run_needs(tmp_path, operator, capsys):
    """``fedbits flower app --sign`` for plain ``flwr run``: the printed override verifies
    against the bundle ``flwr run`` builds from the written directory."""
    assert main(["flower", "app", str(TINY), "--out", str(tmp_path / "out"),
                 "--sign", str(operator)]) == 0
    out = capsys.readouterr().out
    signature = out.split(f'{SIGNATURE_KEY}="', 1)[1].split('"', 1)[0]
    fab = build_fab_from_disk(tmp_path / "out" / "fedbits-app")
    assert verify(fab, {SIGNATURE_KEY: signature}, _trusted(operator))
    assert "--run-config" in out and "submit it unchanged" in out
