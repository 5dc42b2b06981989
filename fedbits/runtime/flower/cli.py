"""``fedbits flower ...``: the commands that set up and drive a Flower deployment.

A run itself is launched with ``fedbits run CONFIG`` and ``runtime.kind = "flower"``;
these commands make the pieces it needs (certificates, SuperLink, SuperNodes, the
connection entry ``flwr`` reads) and re-attach to a run. docs/flower.md walks
through them in order.

Bad numbers and addresses are refused while the command line is parsed, before
anything starts; files that exist (certificates, keys, an app) are replaced only
with ``--force``.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import sys
from pathlib import Path

from fedbits.errors import FedbitsError

logger = logging.getLogger(__name__)


def _int_at_least(low: int, what: str, text: str) -> int:
    """An argparse ``type``: an integer ``>= low``, else a usage error saying so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


_non_negative = functools.partial(_int_at_least, 0, "a non-negative integer")
_positive = functools.partial(_int_at_least, 1, "a positive integer")


def _port(text: str) -> int:
    """An argparse ``type``: a TCP port, 1..65535."""
    port = _int_at_least(1, "a port number (1..65535)", text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1..65535)")
    return port


def _address(text: str) -> str:
    """An argparse ``type``: ``HOST:PORT`` (see :func:`~.app.check_address`)."""
    from fedbits.runtime.flower.app import check_address

    try:
        return check_address(text)
    except FedbitsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps a port to this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _certs(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.certs import (
        CertPaths,
        make_certificates,
        make_node_key,
        node_key_files,
        refuse_to_replace,
    )

    out = Path(args.dir)
    if not args.force:  # check every file first: a refusal must leave a complete old set
        refuse_to_replace(CertPaths.in_dir(out).files() + [
            f for i in range(args.nodes) for f in node_key_files(out / f"node-{i}")])
    paths = make_certificates(out, args.host, force=args.force)
    print(f"CA: {paths.ca_cert} (give it to every SuperNode and operator)")
    print(f"SuperLink: {paths.server_cert}, {paths.server_key} (valid for {', '.join(args.host)})")
    for i in range(args.nodes):
        pub = make_node_key(out / f"node-{i}", force=args.force)
        print(f"SuperNode {i}: private key {out / f'node-{i}'}, public key {pub} "
              f"(register it: flwr supernode register {pub} <connection>)")


def _superlink(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.processes import exec_superlink

    if not _is_loopback(args.host):
        logger.warning(f"Flower's control API listens on {args.host}:{args.port} with the "
                       "Fleet API and has no user authentication: whoever reaches it can run "
                       "code on this machine and on every SuperNode (docs/flower.md, "
                       "\"Restricting the control port\")")
    exec_superlink(Path(args.dir), args.host, args.port, Path(args.certs) if args.certs else None,
                   args.insecure, args.enable_supernode_auth)


def _supernode(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.processes import SuperNodeSupervisor

    default = Path.home() / ".fedbits" / "flower-node" / f"partition-{args.partition_id}"
    root = Path(args.dir) if args.dir else default
    supervisor = SuperNodeSupervisor(
        superlink=args.superlink, partition=args.partition_id, root=root,
        runtime_port=args.runtime_port,
        root_certificates=Path(args.root_certificates) if args.root_certificates else None,
        insecure=args.insecure, auth_key=Path(args.auth_key) if args.auth_key else None,
        worker=not args.no_worker,
    )
    status = supervisor.run()
    if status:
        raise FedbitsError(f"the SuperNode for partition {args.partition_id} stopped "
                           f"(status {status}); its log above says why")


def _connect(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.app import write_connection

    ca = Path(args.root_certificates) if args.root_certificates else None
    path, default = write_connection(args.name, args.address, root_certificates=ca,
                                     insecure=args.insecure, default=args.default)
    print(f"SuperLink connection {args.name!r} -> {args.address} written to {path}")
    if default == args.name:
        print(f"{args.name!r} is flwr's default connection: `fedbits run` uses it unless "
              "runtime.superlink names another")
    else:
        print(f"the default connection stays {default!r}: set runtime.superlink = "
              f"\"{args.name}\" to use this one, or pass --default")


def _app(args: argparse.Namespace) -> None:
    from fedbits.resolve import load_config
    from fedbits.runtime.flower.app import write_app

    cfg = load_config(args.config, args.set)
    cfg.run.out_dir = str(Path(cfg.run.out_dir).resolve())
    app = write_app(cfg, Path(args.out), resume=args.resume, overwrite=args.overwrite,
                    force=args.force)
    print(f"Flower App written to {app}: submit it with `flwr run {app} <connection> --stream`")


def _follow(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.launch import follow

    follow(args.run_id, Path(args.run_dir).resolve(), args.superlink)


def _usage(parser: argparse.ArgumentParser, _args: argparse.Namespace) -> None:
    """``fedbits flower`` without a subcommand: its help, which lists them, and status 2."""
    parser.print_help(sys.stderr)
    parser.exit(2, f"\n{parser.prog}: error: choose one of the subcommands above\n")


def add_flower_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedbits flower`` and its subcommands."""
    flower = sub.add_parser("flower", help="set up and drive runs on Flower (see docs/flower.md)",
                            description="Set up and drive runs on Flower (see docs/flower.md).")
    flower.set_defaults(func=functools.partial(_usage, flower))
    fsub = flower.add_subparsers(dest="flower_command", title="subcommands")

    def tls(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--root-certificates", metavar="CA", help="the SuperLink's CA certificate")
        g.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only)")

    p = fsub.add_parser("certs", help="make a CA, a SuperLink certificate and SuperNode key pairs")
    p.add_argument("dir")
    p.add_argument("--host", action="append", required=True,
                   help="IP or DNS name nodes and operators use for the SuperLink (repeatable)")
    p.add_argument("--nodes", type=_positive, default=0,
                   help="SuperNode authentication key pairs to make (default: none)")
    p.add_argument("--force", action="store_true",
                   help="replace existing files (a new CA: every node and operator needs it)")
    p.set_defaults(func=_certs)

    p = fsub.add_parser("superlink", help="start a SuperLink (replaces this process)")
    p.add_argument("--dir", default=str(Path.home() / ".fedbits" / "superlink"),
                   help="state: database, installed apps")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback). Flower 1.41 serves its "
                   "unauthenticated control API on the same address and port as the Fleet "
                   "API: expose the Fleet API through a proxy instead (docs/flower.md)")
    p.add_argument("--port", type=_port, default=8000)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--certs", help="directory from `fedbits flower certs`")
    g.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only)")
    p.add_argument("--enable-supernode-auth", action="store_true",
                   help="accept only SuperNodes whose public key was registered")
    p.set_defaults(func=_superlink)

    p = fsub.add_parser("supernode", help="start a SuperNode and its worker for one data partition")
    p.add_argument("--superlink", required=True, type=_address, metavar="HOST:PORT")
    p.add_argument("--partition-id", type=_non_negative, required=True,
                   help="the data partition this node trains on (0, 1, ...)")
    p.add_argument("--dir", help="node state: client stores, worker socket "
                   "(default ~/.fedbits/flower-node/partition-N)")
    p.add_argument("--runtime-port", type=_port, default=9094,
                   help="local port of the SuperNode's ClientApp API (one per SuperNode on a host)")
    tls(p)
    p.add_argument("--auth-key", help="private key for SuperNode authentication")
    p.add_argument("--no-worker", action="store_true",
                   help="no long-lived worker: each message reloads the model")
    p.set_defaults(func=_supernode)

    p = fsub.add_parser("connect", help="add a SuperLink connection to $FLWR_HOME/config.toml")
    p.add_argument("name", help="letters, digits, '-' and '_'")
    p.add_argument("--address", required=True, metavar="HOST:PORT",
                   help="the SuperLink's address, e.g. 10.0.0.5:8000 or [2001:db8::5]:8000")
    tls(p)
    p.add_argument("--default", action="store_true",
                   help="make it flwr's default connection (the first one becomes the default "
                   "anyway; an existing default is otherwise kept)")
    p.set_defaults(func=_connect)

    p = fsub.add_parser("app", help="write the Flower App for a config (for plain `flwr run`)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", required=True, help="directory to write the app into")
    p.add_argument("--resume", action="store_true", help="the run continues from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="the run replaces its run directory")
    p.add_argument("--force", action="store_true",
                   help="write into an existing app directory (replaces its pyproject.toml)")
    p.set_defaults(func=_app)

    p = fsub.add_parser("follow", help="stream a Flower run's log, then record its traffic")
    p.add_argument("run_id", type=_non_negative)
    p.add_argument("--run-dir", required=True, help="the run's directory (run.out_dir/run.name)")
    p.add_argument("--superlink", help="connection name (default: flwr's default)")
    p.set_defaults(func=_follow)

