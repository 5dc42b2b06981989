"""``fedbits flower ...``: the commands that set up and drive a Flower deployment.

A run itself is launched with ``fedbits run CONFIG`` and ``runtime.kind = "flower"``;
these commands make the pieces it needs (certificates, a node's key pair, the
operator's app-signing key, SuperLink,
SuperNodes, the connection entry ``flwr`` reads) and re-attach to a run.
docs/flower.md walks through them in order.

Bad numbers and addresses are refused while the command line is parsed, before
anything starts; files that exist (certificates, keys, an app) are replaced only
with ``--force`` (``certs --renew`` replaces only the SuperLink's certificate).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedbits.errors import FedbitsError

if TYPE_CHECKING:
    from fedbits.runtime.flower.holder import NodeSettings

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


def _positive_number(text: str) -> float:
    """An argparse ``type``: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _pin(text: str) -> str:
    """An argparse ``type``: one pin, a name on one line."""
    if not text.strip() or any(ord(c) < 32 for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a name (one line, not empty)")
    return text.strip()


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
    from fedbits.runtime.flower.certs import make_certificates, renew_server_certificate

    out = Path(args.dir)
    if args.renew:
        paths = renew_server_certificate(out, args.host)
        print(f"SuperLink: new {paths.server_cert}, {paths.server_key} from the CA "
              f"{paths.ca_cert} (unchanged): restart the SuperLink (and its proxy) to use them")
    else:
        paths = make_certificates(out, args.host, force=args.force)
        print(f"CA: {paths.ca_cert} (give it to every SuperNode and operator); its key "
              f"{paths.ca_key} stays here")
        print(f"SuperLink: {paths.server_cert}, {paths.server_key}")
    print(f"the SuperLink certificate is valid for {', '.join(args.host)} until "
          f"{_not_after(paths.server_cert)}; renew it with --renew before then")


def _not_after(cert: Path) -> str:
    """A certificate's last day, as the operator should note it."""
    from cryptography import x509

    return f"{x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc:%Y-%m-%d}"


def _keygen(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.certs import make_node_key

    private = Path(args.key).expanduser()
    public = make_node_key(private, force=args.force)
    print(f"private key: {private} (mode 0600: it stays on this machine; start the SuperNode "
          f"with --auth-key {private})")
    print(f"public key: {public}; send it to the SuperLink's operator, who registers it with "
          f"`flwr supernode register {public.name} <connection>`:")
    print(public.read_text().strip())


def _signing_key(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.signing import SIGNING_KEY_ENV, make_signing_key

    private = Path(args.key).expanduser()
    public, trusted = make_signing_key(private, force=args.force)
    print(f"private key: {private} (mode 0600: it stays with the operator; `fedbits run` "
          f"signs every app with it when {SIGNING_KEY_ENV}={private})")
    print(f"public key: {public}")
    print(f"trusted entities: {trusted}; give it to every data holder, who starts the "
          f"SuperNode with --trusted-entities {trusted.name}:")
    print(trusted.read_text().strip())


def _superlink(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.processes import exec_superlink

    if not _is_loopback(args.host):
        exposure = (f"Flower's control API listens on {args.host}:{args.port} with the Fleet "
                    "API and has no user authentication: whoever reaches it can submit apps "
                    "that run code on this machine and on every SuperNode that does not "
                    "check signatures, and register node keys of their own (docs/flower.md, "
                    "\"Restricting the control port\")")
        if not args.expose_control_api:
            raise FedbitsError(f"--host {args.host} is refused: {exposure}. Keep the default "
                               "127.0.0.1 and expose /v1/fleet/ alone through a reverse proxy, "
                               "or pass --expose-control-api to accept this")
        logger.warning("--expose-control-api: %s", exposure)
    state = Path(args.dir)
    runs = Path(args.runs_dir) if args.runs_dir else state / "runs"
    exec_superlink(state, args.host, args.port, Path(args.certs) if args.certs else None,
                   args.insecure, args.enable_supernode_auth, runs)


def _data_spec(text: str) -> str:
    """``--data``: a spec (``builtin:``, ``hf:``) as it is, a path made absolute (the
    worker and the ClientApp may start elsewhere); a missing path is refused."""
    if text.startswith(("builtin:", "hf:")):
        return text
    path = Path(text).expanduser().absolute()
    if not path.exists():
        raise FedbitsError(f"--data {text}: not found")
    return str(path)


def _node_settings(args: argparse.Namespace) -> NodeSettings:
    """The node config these flags make, checked exactly as the worker will read it."""
    from fedbits.runtime.flower import holder

    own = args.client_id is not None
    if own != (args.data is not None):
        raise FedbitsError("--data (this data holder's own data) goes with --client-id N; "
                           "--partition-id N is the shared-source demo, without --data")
    number = args.client_id if own else args.partition_id
    kind = "client" if own else "partition"
    root = Path(args.dir) if args.dir else Path.home() / ".fedbits" / "flower-node" / \
        f"{kind}-{number}"
    config: dict[str, object] = {
        holder.CLIENT_KEY if own else holder.PARTITION_KEY: number,
        holder.DIR_KEY: str(root.expanduser().absolute()), holder.WORKER_KEY: not args.no_worker,
    }
    if own:
        config[holder.DATA_KEY] = _data_spec(args.data)
    if args.allow_model:
        config[holder.ALLOW_MODEL_KEY] = "\n".join(args.allow_model)
    if args.allow_method:
        config[holder.ALLOW_METHOD_KEY] = "\n".join(args.allow_method)
    if args.max_rounds is not None:
        config[holder.MAX_ROUNDS_KEY] = args.max_rounds
    if args.max_payload_mb is not None:
        config[holder.MAX_PAYLOAD_KEY] = args.max_payload_mb
    settings = holder.NodeSettings.from_node_config(config)
    for pin in settings.pins.models:
        if holder.is_local_path(pin.name) and not Path(pin.name).exists():
            raise FedbitsError(f"--allow-model {pin.name}: not found on this node")
    return settings


def _supernode(args: argparse.Namespace) -> None:
    from fedbits.data.examples import load_examples
    from fedbits.runtime.flower.processes import SuperNodeSupervisor

    settings = _node_settings(args)
    if settings.data is not None:  # refused now, not at the first run
        examples = load_examples(settings.data)
        logger.info("client %d: %d examples of its own in %s; it accepts models %s and "
                    "methods %s", settings.client, len(examples), settings.data,
                    ", ".join(map(str, settings.pins.models)), ", ".join(settings.pins.methods))
    else:
        logger.warning(
            "--partition-id %d is the shared-source demo: this node loads the data.source "
            "each run names (a path or spec the server chooses) and trains on partition %d "
            "of it. A data holder starts with --data PATH --client-id N instead "
            "(docs/flower.md)", settings.client, settings.client)
        if not (settings.pins.models and settings.pins.methods):
            logger.warning("without --allow-model and --allow-method this node accepts any "
                           "model and any method a run names")
    trusted = Path(args.trusted_entities).expanduser() if args.trusted_entities else None
    if trusted is None:
        logger.warning("without --trusted-entities this node runs any app the SuperLink "
                       "hands it, from whoever reached its Control API (docs/flower.md, "
                       "\"Signed apps\")")
    supervisor = SuperNodeSupervisor(
        superlink=args.superlink, settings=settings, runtime_port=args.runtime_port,
        root_certificates=Path(args.root_certificates) if args.root_certificates else None,
        insecure=args.insecure, auth_key=Path(args.auth_key) if args.auth_key else None,
        trusted_entities=trusted,
    )
    status = supervisor.run()
    if status:
        raise FedbitsError(f"the SuperNode for {settings.who} stopped (status {status}); its "
                           "log above says why")


def _holders(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.identity import HOLDERS_FILE, Holders, public_key_file_fingerprint

    directory = Path(args.dir).expanduser()
    if not directory.is_dir():
        raise FedbitsError(f"{directory} is not a directory: give the SuperLink's --dir (or a "
                           "run directory, for a run's own bindings)")
    holders = Holders(directory / HOLDERS_FILE)
    if args.bind:
        client, public = args.bind
        try:
            number = _non_negative(client)
        except argparse.ArgumentTypeError as e:
            raise FedbitsError(f"--bind CLIENT: {e}") from None
        old = holders.bind(number, public_key_file_fingerprint(Path(public)))
        print(f"client {number} is bound to {public}" +
              (f" (it was bound to {old.key})" if old else ""))
    if args.release is not None:
        old = holders.release(args.release)
        print(f"client {args.release}: " + (f"released (it was bound to {old.key}); the next "
                                             "node to claim it is bound" if old else "not bound"))
    bindings = holders.read()
    for client, b in sorted(bindings.items()):
        seen = f"SuperNode {b.node}" if b.node else "not seen yet"
        print(f"client {client}: key {b.key} ({seen}; bound since {b.since})")
    if not bindings:
        print(f"no data holder is bound in {holders.path}")


def _model_pin(args: argparse.Namespace) -> None:
    from fedbits.runtime.flower.holder import ModelPin, weights_sha256

    pin = ModelPin.parse(args.path)
    print(f"--allow-model {ModelPin(pin.name, weights_sha256(Path(pin.name)))}")


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
    app = write_app(cfg, Path(args.out), resume=args.resume, force=args.force)
    if args.sign is None:
        print(f"Flower App written to {app}: submit it with `flwr run {app} <connection> "
              "--stream`")
        return
    from fedbits.runtime.flower.signing import sign_app, signature_override

    override = signature_override(sign_app(app, Path(args.sign).expanduser()))
    print(f"Flower App written to {app} and signed: submit it unchanged with `flwr run {app} "
          f"<connection> {shlex.join(override)} --stream`")


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

    p = fsub.add_parser("certs", help="make a CA and a SuperLink certificate, or renew the "
                        "certificate")
    p.add_argument("dir")
    p.add_argument("--host", action="append", required=True,
                   help="IP or DNS name nodes and operators use for the SuperLink (repeatable)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--renew", action="store_true",
                   help="keep the CA in DIR, issue a new SuperLink certificate and key from it")
    g.add_argument("--force", action="store_true",
                   help="replace existing files (a new CA: every node and operator needs it)")
    p.set_defaults(func=_certs)

    p = fsub.add_parser("keygen", help="make this SuperNode's authentication key pair (run it "
                        "on the node)")
    p.add_argument("key", help="private key file to write (mode 0600); the public key goes to "
                   "KEY.pub")
    p.add_argument("--force", action="store_true",
                   help="replace an existing key pair (the new public key must be registered)")
    p.set_defaults(func=_keygen)

    p = fsub.add_parser("signing-key", help="make the operator's app-signing key pair and "
                        "the trusted-entities file for the nodes")
    p.add_argument("key", help="private key file to write (mode 0600); also writes KEY.pub "
                   "and KEY.trusted-entities.yaml")
    p.add_argument("--force", action="store_true",
                   help="replace an existing key (every node then needs the new file)")
    p.set_defaults(func=_signing_key)

    p = fsub.add_parser("superlink", help="start a SuperLink (replaces this process)")
    p.add_argument("--dir", default=str(Path.home() / ".fedbits" / "superlink"),
                   help="state: database, installed apps")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback). Flower 1.41 serves its "
                   "unauthenticated control API on the same address and port as the Fleet "
                   "API, so any other address is refused unless --expose-control-api: "
                   "expose the Fleet API through a proxy instead (docs/flower.md)")
    p.add_argument("--expose-control-api", action="store_true",
                   help="accept a non-loopback --host, which hands the control API (submit "
                   "apps, register node keys) to everyone who reaches it")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--runs-dir", help="where this host writes every run, whatever the "
                   "submitted config's run.out_dir (default: DIR/runs)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--certs", help="directory from `fedbits flower certs`")
    g.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only)")
    p.add_argument("--enable-supernode-auth", action="store_true",
                   help="accept only SuperNodes whose public key was registered")
    p.set_defaults(func=_superlink)

    p = fsub.add_parser("supernode", help="start a SuperNode and its worker for one data holder")
    p.add_argument("--superlink", required=True, type=_address, metavar="HOST:PORT")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--client-id", type=_non_negative,
                     help="the client this data holder is in every run (0, 1, ...), with --data")
    who.add_argument("--partition-id", type=_non_negative,
                     help="the shared-source demo (tests, one machine): train on partition N "
                     "of each run's data.source instead of data of this node's own")
    p.add_argument("--data", metavar="PATH_OR_SPEC",
                   help="this data holder's data: a .json/.jsonl file, a folder of them, a "
                   "saved dataset, hf:NAME or builtin:tasks; never sent anywhere")
    p.add_argument("--allow-model", action="append", default=[], type=_pin, metavar="MODEL",
                   help="a model this node accepts: a name, a path, or PATH@sha256:HEX "
                   "(`fedbits flower model-pin PATH`); repeatable, required with --data")
    p.add_argument("--allow-method", action="append", default=[], type=_pin, metavar="METHOD",
                   help="a method this node accepts; repeatable, required with --data")
    p.add_argument("--max-rounds", type=functools.partial(_int_at_least, 1, "a positive integer"),
                   help="refuse a run of more rounds")
    p.add_argument("--max-payload-mb", type=_positive_number,
                   help="open or send no payload larger than this here, whatever the run's "
                   "runtime.max_payload_mb")
    p.add_argument("--dir", help="node state: client stores, worker socket "
                   "(default ~/.fedbits/flower-node/client-N or partition-N)")
    p.add_argument("--runtime-port", type=_port, default=9094,
                   help="local port of the SuperNode's ClientApp API (one per SuperNode on a host)")
    tls(p)
    p.add_argument("--auth-key", help="private key for SuperNode authentication")
    p.add_argument("--trusted-entities", metavar="FILE",
                   help="run only apps signed by a key in FILE (the operator's "
                   "KEY.trusted-entities.yaml from `fedbits flower signing-key`)")
    p.add_argument("--no-worker", action="store_true",
                   help="no long-lived worker: each message reloads the model")
    p.set_defaults(func=_supernode)

    p = fsub.add_parser("holders", help="list, bind or release the data holders' node keys "
                        "(on the SuperLink host)")
    p.add_argument("--dir", default=str(Path.home() / ".fedbits" / "superlink"),
                   help="the SuperLink's --dir (bindings of every run, with "
                   "--enable-supernode-auth), or a run directory (that run's own)")
    p.add_argument("--bind", nargs=2, metavar=("CLIENT", "PUBLIC_KEY"),
                   help="bind client CLIENT to the node key in PUBLIC_KEY (its .pub file), "
                   "ahead of its first contact or to replace its key")
    p.add_argument("--release", type=_non_negative, metavar="CLIENT",
                   help="forget client CLIENT's key: the next node to claim it is bound")
    p.set_defaults(func=_holders)

    p = fsub.add_parser("model-pin", help="print the --allow-model pin of a local model "
                        "(its path and the sha256 of its weights)")
    p.add_argument("path", help="a model directory or GGUF file on this node")
    p.set_defaults(func=_model_pin)

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
    p.add_argument("--force", action="store_true",
                   help="write into an existing app directory (replaces its pyproject.toml)")
    p.add_argument("--sign", metavar="KEY", help="sign the app with this key (`fedbits flower "
                   "signing-key`) and print the flwr run arguments that carry the signature")
    p.set_defaults(func=_app)

    p = fsub.add_parser("follow", help="stream a Flower run's log, then record its traffic")
    p.add_argument("run_id", type=_non_negative)
    p.add_argument("--run-dir", required=True, help="the run's directory (run.out_dir/run.name)")
    p.add_argument("--superlink", help="connection name (default: flwr's default)")
    p.set_defaults(func=_follow)

