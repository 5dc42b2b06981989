"""The Flower App a fedbits run is submitted as, and the SuperLink connection config.

A Flower App is a directory with a ``pyproject.toml`` (``flwr new`` makes one, but
needs the internet). fedbits writes it directly: the components are fedbits' own
ServerApp and ClientApp (imported from the installed package, so the bundle holds
only this file), and the run config carries the whole resolved fedbits config as
TOML text, so every node trains with exactly the server's settings.

``flwr`` finds SuperLinks by name in ``$FLWR_HOME/config.toml`` (default
``~/.flwr``); :func:`write_connection` adds or replaces one entry there and keeps
the rest of the file.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import tomli_w

from fedbits import __version__
from fedbits.config import Config
from fedbits.errors import FedbitsError
from fedbits.runtime.flower.protocol import CONFIG_KEY, OVERWRITE_KEY, RESUME_KEY

APP_NAME = "fedbits-app"  # also the directory name: Flower requires them to be valid names


def write_app(cfg: Config, directory: Path, *, resume: bool = False,
              overwrite: bool = False) -> Path:
    """Write the Flower App for ``cfg`` into ``directory`` (named :data:`APP_NAME`).

    The shipped config says ``runtime.kind = "flower"`` whatever ``cfg`` said, so the
    run directory records where it ran and ``fedbits run --resume`` accepts it.
    """
    cfg = cfg.model_copy(deep=True)
    cfg.runtime.kind = "flower"
    if directory.name != APP_NAME:
        directory = directory / APP_NAME
    directory.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["setuptools>=77"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": APP_NAME,
            "version": __version__,
            "description": f"fedbits run {cfg.run.name!r}: {cfg.method.name} on {cfg.model.name}",
            "license": "Apache-2.0",
            # informational: SuperLink and SuperNodes run with runtime dependency
            # installation disabled and use the environment fedbits is installed in
            "dependencies": [f"fedbits=={__version__}", "flwr==1.41.*"],
        },
        "tool": {"flwr": {"app": {
            "publisher": "fedbits",
            "components": {
                "serverapp": "fedbits.runtime.flower.server_app:app",
                "clientapp": "fedbits.runtime.flower.client_app:app",
            },
            "config": {CONFIG_KEY: cfg.to_toml(), RESUME_KEY: resume, OVERWRITE_KEY: overwrite},
        }}},
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return directory


def flwr_home() -> Path:
    """Flower's own configuration directory (``$FLWR_HOME``, else ``~/.flwr``)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def write_connection(name: str, address: str, *, root_certificates: Path | None = None,
                     insecure: bool = False, default: bool = False) -> Path:
    """Add (or replace) ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``."""
    if insecure == (root_certificates is not None):
        raise FedbitsError("give the SuperLink's CA certificate (--root-certificates) or "
                           "--insecure, not both and not neither")
    path = flwr_home() / "config.toml"
    data = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if insecure:
        entry["insecure"] = True
    else:
        assert root_certificates is not None
        if not root_certificates.is_file():
            raise FedbitsError(f"CA certificate {root_certificates} not found")
        entry["root-certificates"] = str(root_certificates.resolve())
    links[name] = entry
    if default or "default" not in links:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path
