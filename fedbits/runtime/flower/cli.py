"""``fedbits flower ...``: the commands that set up and drive a Flower deployment.

A run itself is launched with ``fedbits run CONFIG`` and ``runtime.kind = "flower"``;
these commands make the pieces it needs (certificates, SuperLink, SuperNodes, the
connection entry ``flwr`` reads) and re-attach to a run. docs/flower.md walks
through them in order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedbits.errors import FedbitsError


def _certs(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.certs import make_certificates, make_node_key

    out = Path(args.dir)
    paths = make_certificates(out, args.host)
    print(f"CA: {paths.ca_cert} (give it to every SuperNode and operator)")
    print(f"SuperLink: {paths.server_cert}, {paths.server_key} (valid for {', '.join(args.host)})")
    for i in range(args.nodes):
        pub = make_node_key(out / f"node-{i}")
        print(f"SuperNode {i}: private key {out / f'node-{i}'}, public key {pub} "
              f"(register it: flwr supernode register {pub} <connection>)")


def _superlink(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.processes import exec_superlink

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
    path = write_connection(args.name, args.address, root_certificates=ca,
                            insecure=args.insecure, default=args.default)
    print(f"SuperLink connection {args.name!r} -> {args.address} written to {path}")


def _app(args: argparse.Namespace) -> None:
    from fedbits.config import load_config
    from fedbits.runtime.flower.app import write_app

    cfg = load_config(args.config, args.set)
    cfg.run.out_dir = str(Path(cfg.run.out_dir).resolve())
    app = write_app(cfg, Path(args.out), resume=args.resume, overwrite=args.overwrite)
    print(f"Flower App written to {app}: submit it with `flwr run {app} <connection> --stream`")


def _follow(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.launch import follow

    follow(args.run_id, Path(args.run_dir).resolve(), args.superlink)


def add_flower_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``fedbits flower`` and its subcommands."""
    flower = sub.add_parser("flower", help="set up and drive runs on Flower (see docs/flower.md)")
    fsub = flower.add_subparsers(dest="flower_command", required=True)

    def tls(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--root-certificates", metavar="CA", help="the SuperLink's CA certificate")
        g.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only)")

    p = fsub.add_parser("certs", help="make a CA, a SuperLink certificate and SuperNode key pairs")
    p.add_argument("dir")
    p.add_argument("--host", action="append", required=True,
                   help="IP or DNS name nodes and operators use for the SuperLink (repeatable)")
    p.add_argument("--nodes", type=int, default=0,
                   help="SuperNode authentication key pairs to make")
    p.set_defaults(func=_certs)

    p = fsub.add_parser("superlink", help="start a SuperLink (replaces this process)")
    p.add_argument("--dir", default=str(Path.home() / ".fedbits" / "superlink"),
                   help="state: database, installed apps")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the control API too (see docs)")
    p.add_argument("--port", type=int, default=8000)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--certs", help="directory from `fedbits flower certs`")
    g.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only)")
    p.add_argument("--enable-supernode-auth", action="store_true",
                   help="accept only SuperNodes whose public key was registered")
    p.set_defaults(func=_superlink)

    p = fsub.add_parser("supernode", help="start a SuperNode and its worker for one data partition")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT")
    p.add_argument("--partition-id", type=int, required=True,
                   help="the data partition this node trains on")
    p.add_argument("--dir", help="node state: client stores, worker socket "
                   "(default ~/.fedbits/flower-node/partition-N)")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="local port of the SuperNode's ClientApp API (one per SuperNode on a host)")
    tls(p)
    p.add_argument("--auth-key", help="private key for SuperNode authentication")
    p.add_argument("--no-worker", action="store_true",
                   help="no long-lived worker: each message reloads the model")
    p.set_defaults(func=_supernode)

    p = fsub.add_parser("connect", help="add a SuperLink connection to $FLWR_HOME/config.toml")
    p.add_argument("name")
    p.add_argument("--address", required=True, metavar="HOST:PORT")
    tls(p)
    p.add_argument("--default", action="store_true", help="make it flwr's default connection")
    p.set_defaults(func=_connect)

    p = fsub.add_parser("app", help="write the Flower App for a config (for plain `flwr run`)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", required=True, help="directory to write the app into")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_app)

    p = fsub.add_parser("follow", help="stream a Flower run's log, then record its traffic")
    p.add_argument("run_id", type=int)
    p.add_argument("--run-dir", required=True, help="the run's directory (run.out_dir/run.name)")
    p.add_argument("--superlink", help="connection name (default: flwr's default)")
    p.set_defaults(func=_follow)

