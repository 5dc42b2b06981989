"""The Flower App a fedbits run is submitted as, and the SuperLink connection config.

A Flower App is a directory with a ``pyproject.toml`` (``flwr new`` makes one, but
needs the internet). fedbits writes it directly: the components are fedbits' own
ServerApp and ClientApp (imported from the installed package, so the bundle holds
only this file), and the run config carries the whole resolved fedbits config as
TOML text, so every node trains with exactly the server's settings.

``flwr`` finds SuperLinks by name in ``$FLWR_HOME/config.toml`` (default
``~/.flwr``); :func:`write_connection` adds or replaces one entry there and keeps
the rest of the file, and :func:`resolve_connection` picks the one a run goes to,
refusing before anything starts when there is none: ``flwr`` would then start its
own local simulation SuperLink, which cannot run fedbits' apps.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from fedbits import __version__
from fedbits.config import Config, faults_refusal
from fedbits.errors import ConfigError, FedbitsError
from fedbits.resolve import config_toml
from fedbits.runtime.flower.protocol import CONFIG_KEY, RESUME_KEY
from fedbits.runtime.flower.signing import SIGNATURE_KEY

APP_NAME = "fedbits-app"  # also the directory name: Flower requires them to be valid names

_CONNECTION_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a TOML bare key: [superlink.NAME]
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ADDRESS = re.compile(r"\[(?P<v6>[^\]]*)\]:(?P<v6port>\d+)|(?P<host>[^:\[\]]+):(?P<port>\d+)")


def write_app(cfg: Config, directory: Path, *, resume: bool = False,
              force: bool = False) -> Path:
    """Write the Flower App for ``cfg`` into ``directory`` (named :data:`APP_NAME`).

    The shipped config says ``runtime.kind = "flower"`` whatever ``cfg`` said, so the
    run directory records where it ran and ``fedbits run --resume`` accepts it. It also
    says ``robust.server_weighting = "uniform"`` unless ``cfg`` set it: on real nodes a
    sample count is a client's own claim, so by default every client weighs the same
    (``robust.max_weight`` bounds a claim whenever samples do weigh).
    ``resume`` is the run's ``--resume`` (there is no ``--overwrite``: the SuperLink
    host never deletes a run directory because a run asks). An app directory that
    already holds files is refused unless ``force``, since ``flwr run`` bundles
    whatever is in it.
    """
    if cfg.faults is not None:  # its own kind may say simulation: refused before shipping
        raise ConfigError(faults_refusal("flower"))
    cfg = cfg.model_copy(deep=True)
    cfg.runtime.kind = "flower"
    if "server_weighting" not in cfg.robust.model_fields_set:
        cfg.robust.server_weighting = "uniform"
    if directory.name != APP_NAME:
        directory = directory / APP_NAME
    if directory.exists() and not directory.is_dir():
        raise FedbitsError(f"{directory} exists and is not a directory: choose another --out")
    if not force and directory.is_dir() and any(directory.iterdir()):
        raise FedbitsError(f"Flower App directory {directory} already exists: pass --force to "
                           "replace its pyproject.toml, or choose another --out")
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
            # the signature is an override (it cannot be in the bundle it signs); Flower
            # accepts an override only for a key the app declares
            "config": {CONFIG_KEY: config_toml(cfg), RESUME_KEY: resume, SIGNATURE_KEY: ""},
        }}},
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return directory


def flwr_home() -> Path:
    """Flower's own configuration directory (``$FLWR_HOME``, else ``~/.flwr``)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def check_connection_name(name: str) -> None:
    """Refuse a connection name that is not a TOML bare key, or is ``default``
    (``[superlink] default = ...`` names the default connection)."""
    if not _CONNECTION_NAME.fullmatch(name) or name == "default":
        raise FedbitsError(f"connection name {name!r} is not allowed: use letters, digits, "
                           "'-' and '_' only (and not 'default')")


def check_address(address: str) -> str:
    """``address`` if it is ``HOST:PORT``: a DNS name, an IPv4 address or a bracketed
    IPv6 address, and a port from 1 to 65535; else an error naming what is wrong."""
    example = "e.g. superlink.example.org:8000, 10.0.0.5:8000 or [2001:db8::5]:8000"
    match = _ADDRESS.fullmatch(address)
    if match is None:
        raise FedbitsError(f"address {address!r} is not HOST:PORT ({example})")
    host = match["v6"] if match["v6"] is not None else match["host"]
    port = int(match["v6port"] or match["port"])
    try:
        if match["v6"] is not None:
            ipaddress.IPv6Address(host)
        elif re.fullmatch(r"[0-9.]+", host):
            ipaddress.IPv4Address(host)
        elif len(host) > 253 or not all(_HOST_LABEL.fullmatch(label)
                                        for label in host.removesuffix(".").split(".")):
            raise ValueError(host)
    except ValueError:
        raise FedbitsError(f"address {address!r}: {host!r} is not a host name or IP "
                           f"address ({example})") from None
    if not 1 <= port <= 65535:
        raise FedbitsError(f"address {address!r}: port {port} is not in 1..65535")
    return address


def _read_flower_config(path: Path) -> dict[str, Any]:
    """``$FLWR_HOME/config.toml`` as a dict (empty when there is none)."""
    try:
        return tomllib.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FedbitsError(f"cannot read Flower's configuration {path}: {e}") from None


def resolve_connection(name: str | None) -> str:
    """The connection a run goes to: ``name`` (``runtime.superlink``), else flwr's default.

    Refused, naming the reason, when there is none, or when it is Flower's local
    simulation (``address = ":local:"``, the default of a fresh ``~/.flwr``, or no
    address at all): ``flwr`` would start its own ``flower-superlink --simulation``
    with runtime dependency installation on, which downloads packages, cannot run
    fedbits' apps and outlives the command.
    """
    path = flwr_home() / "config.toml"
    table = _read_flower_config(path).get("superlink")
    links: dict[str, Any] = table if isinstance(table, dict) else {}
    chosen = name or links.get("default")
    entry = links.get(chosen) if isinstance(chosen, str) else None
    address = entry.get("address") if isinstance(entry, dict) else None
    if isinstance(address, str) and address and not address.startswith(":"):
        return str(chosen)
    if not isinstance(chosen, str) or not chosen:
        reason = (f"{path} names no default connection and runtime.superlink is not set"
                  if path.is_file() else f"{path} does not exist")
    elif not isinstance(entry, dict):
        reason = f"{path} has no connection {chosen!r}"
    else:
        what = f"address {address!r}" if address else "no address"
        reason = f"connection {chosen!r} in {path} is Flower's local simulation ({what})"
    raise ConfigError("no SuperLink connection configured: run `fedbits flower connect NAME "
                      "--address HOST:PORT --root-certificates CA --default` (or --insecure "
                      f"instead of a CA); {reason}")


def write_connection(name: str, address: str, *, root_certificates: Path | None = None,
                     insecure: bool = False, default: bool = False) -> tuple[Path, str]:
    """Add (or replace) ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``.

    It becomes flwr's default connection with ``default``, or when no default is set
    yet (the first connection); an existing default is never replaced silently.
    Returns the file and the default connection's name.
    """
    check_connection_name(name)
    check_address(address)
    if insecure == (root_certificates is not None):
        raise FedbitsError("give the SuperLink's CA certificate (--root-certificates) or "
                           "--insecure, not both and not neither")
    path = flwr_home() / "config.toml"
    data = _read_flower_config(path)
    links = data.setdefault("superlink", {})
    if not isinstance(links, dict):
        raise FedbitsError(f"{path}: 'superlink' is not a table; fix or remove it")
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
    return path, str(links["default"])
