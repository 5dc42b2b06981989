"""fedbits on a real Flower deployment: SuperLink and SuperNodes on 127.0.0.1.

Nothing is mocked. The module starts ``fedbits flower superlink`` with TLS and
SuperNode authentication, registers two SuperNode keys and starts two
``fedbits flower supernode`` processes (each a real ``flower-supernode`` plus its
node worker) for data partitions 0 and 1. Runs are submitted with ``fedbits run``
(``flwr run`` underneath) and compared with the in-process simulator for the same
config and seed, which runs in a thread meanwhile:

- 2 rounds of fedit and of fedkseed give the simulator's final weights bit for bit,
  its ledger byte for byte and its metrics; Flower's traffic figure is recorded;
- a SuperNode whose key was never registered is refused;
- a node worker killed in the middle of a round costs that client the round (the
  ledger has its downlink and no uplink) and nothing else: the round aggregates the
  other client's update, the run ends normally, and the SuperNode's supervisor
  starts a new worker;
- a hostile node whose reply's ``info`` is not a JSON object costs only its own
  round, and a run that names another ``run.out_dir`` is written under the
  SuperLink's runs directory all the same;
- data holders started with their own data and pins: one trains on its data, one
  refuses the run (its reason in the server's metrics and its own log), a third node
  claiming the first one's client with another key is refused and the run goes on,
  and the ServerApp process never opens a holder's data file (an audit hook in every
  ServerApp process, ``tests/serverapp_audit/sitecustomize.py``);
- a node started with the operator's trusted entities runs no code of someone
  else's app (the nodes without them do) and no fedbits app signed with another key,
  and those runs go on without it; the operator's signed run trains on it;
- the SuperLink's ports (Control API included) are not reachable on this machine's
  non-loopback addresses.

The SuperNodes of the first tests are the shared-source demo (``--partition-id``:
each loads the run's ``data.source`` and keeps its partition, as the simulator
splits it), which is what makes a run comparable with the simulator bit for bit;
the server evaluates on ``data.eval_source``, its own set.

Every process a test starts is stopped by PID at teardown together with everything
it started (found through psutil before it is stopped), also when a test fails. The
first tests need no processes: what fedbits writes for Flower must pass Flower's own
readers, and a node's client store must settle rounds as the checkpoints say.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Client, Listener
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from fedbits.cli import main as fedbits_main
from fedbits.methods import available_methods
from fedbits.resolve import config_toml, load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.flower import worker
from fedbits.runtime.flower.app import write_connection
from fedbits.runtime.flower.certs import make_certificates, make_node_key
from fedbits.runtime.flower.holder import NodeSettings
from fedbits.runtime.flower.identity import HOLDERS_FILE, Holders, public_key_file_fingerprint
from fedbits.runtime.flower.keyfiles import write_new
from fedbits.runtime.flower.launch import flower_tool
from fedbits.runtime.flower.local import START_TIMEOUT_S, LocalProcesses, free_port
from fedbits.runtime.flower.node import settle
from fedbits.runtime.flower.protocol import CONFIG_KEY
from fedbits.runtime.flower.signing import SIGNING_KEY_ENV, make_signing_key
from fedbits.runtime.store import ClientStores

from conftest import PLUGINS, REPO, TINY

FEDKSEED = REPO / "examples" / "fedkseed-tiny.toml"
# two partitions, both sampled every round, one SuperNode each; eval at the ends only, on
# a set of the server's own (it never loads data.source); weighted by the nodes' sample
# counts, as the simulator weighs (a deployment weighs uniformly unless told)
SMALL = ["data.num_clients=2", "clients.per_round=2", "run.rounds=2", "eval.every=100",
         "eval.metrics=['loss']", "eval.max_examples=4", "data.eval_source=builtin:tasks",
         "robust.server_weighting=samples"]
AUDIT = REPO / "tests" / "serverapp_audit"
CONNECTION = "secure"


def test_generated_app_and_connection_pass_flowers_own_readers(tmp_path, monkeypatch):
    from flwr.cli.config_utils import load_and_validate
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.common.config import get_fused_config_from_dir

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert fedbits_main(["flower", "certs", str(tmp_path / "tls"), "--host", "127.0.0.1"]) == 0
    assert fedbits_main(["flower", "connect", "prod", "--address", "10.0.0.5:8000",
                         "--root-certificates", str(tmp_path / "tls" / "ca.crt")]) == 0
    assert fedbits_main(["flower", "connect", "local", "--address", "127.0.0.1:8000",
                         "--insecure"]) == 0
    prod, local = read_superlink_connection("prod"), read_superlink_connection("local")
    assert prod.address == "10.0.0.5:8000" and prod.root_certificates.endswith("ca.crt")
    assert local.insecure and read_superlink_connection().address == prod.address  # first = default

    assert fedbits_main(["flower", "app", str(TINY), "--set", "run.name=a b", "--out",
                         str(tmp_path / "app")]) == 0
    app = tmp_path / "app" / "fedbits-app"
    config, _ = load_and_validate(app / "pyproject.toml")  # also imports both components
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"].endswith("client_app:app")
    shipped = get_fused_config_from_dir(app, {})[CONFIG_KEY]
    # every node trains with exactly the server's config; a deployment weighs clients
    # uniformly (a sample count is a node's claim) unless the config says otherwise
    cfg = load_config(TINY, ["run.name=a b", "runtime.kind=flower",
                             "robust.server_weighting=uniform"])
    cfg.run.out_dir = str(Path(cfg.run.out_dir).resolve())
    assert shipped == config_toml(cfg)
    assert fedbits_main(["flower", "app", str(TINY), "--set", "robust.server_weighting=samples",
                         "--out", str(tmp_path / "samples")]) == 0
    kept = get_fused_config_from_dir(tmp_path / "samples" / "fedbits-app", {})[CONFIG_KEY]
    assert 'server_weighting = "samples"' in kept


def test_settle_commits_checkpointed_rounds_and_drops_the_rest(tmp_path):
    stores = ClientStores(tmp_path)
    for round_ in (1, 2, 3):  # a node that took part in rounds 1-3; the server checkpointed 2
        stores.for_client(5, round_).put("state", str(round_).encode())
    stores.for_client(5, 1).put("only-in-1", b"x")
    settle(stores, 2)
    store = stores.for_client(5, 4)
    assert store.get("state") == b"2" and store.get("only-in-1") == b"x"
    assert not (tmp_path / "pending").exists()  # round 3 was cut short: gone


class Federation(LocalProcesses):
    """A secure SuperLink, two authenticated SuperNodes and a stranger."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        # the nodes and the ServerApp import the plugin method like an installed package;
        # every ServerApp records the files it opens under tmp (the audit's sitecustomize)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PLUGINS), str(AUDIT), self.env.get("PYTHONPATH", "")) if p)
        self.opens = tmp / "serverapp-opens.log"
        self.env.update(FEDBITS_TEST_OPENS=str(self.opens), FEDBITS_TEST_WATCH=str(tmp))
        self.tls = tmp / "tls"
        self.nodes: list[tuple[subprocess.Popen, Path]] = []
        self.stranger: tuple[subprocess.Popen, Path] | None = None

    def start_secure_superlink(self) -> None:
        make_certificates(self.tls, ["127.0.0.1", "localhost"])
        self.start_superlink("--certs", str(self.tls), "--enable-supernode-auth")
        write_connection(CONNECTION, self.address, root_certificates=self.tls / "ca.crt")

    def register(self, public_keys: list[Path]) -> list[int]:
        """``flwr supernode register`` each key with the SuperLink (the operator's side);
        the node IDs the SuperLink gave them."""
        register = [flower_tool("flwr"), "supernode", "register"]
        registering = [subprocess.Popen([*register, str(key), CONNECTION], env=self.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                       for key in public_keys]
        ids = []
        for proc in registering:
            out, _ = proc.communicate(timeout=START_TIMEOUT_S)
            assert proc.returncode == 0, out
            found = re.search(r"SuperNode (\d+) registered", out)
            assert found, out
            ids.append(int(found[1]))
        return ids

    def wait_online(self, node_ids: list[int]) -> None:
        """Until ``flwr supernode ls`` says every one of ``node_ids`` is online."""
        argv = [flower_tool("flwr"), "supernode", "ls", CONNECTION, "--format", "json"]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            out = subprocess.run(argv, env=self.env, capture_output=True, text=True).stdout
            try:
                nodes = json.loads(out[out.find("{"):])["nodes"]
            except (ValueError, KeyError):
                nodes = []
            online = {int(n["node-id"]) for n in nodes if n["status"] == "online"}
            if online >= set(node_ids):
                return
            assert time.monotonic() < deadline, out
            time.sleep(1)

    def start_nodes(self) -> None:
        """Partitions 0 and 1 with registered keys, and a stranger whose key is not."""
        keys = {p: self.tmp / "keys" / f"node-{p}" for p in (0, 1, 2)}
        public = {p: make_node_key(key) for p, key in keys.items()}
        self.register([public[0], public[1]])
        secure = ("--root-certificates", str(self.tls / "ca.crt"))
        self.nodes = [self.start_supernode(p, "", *secure, "--auth-key", str(keys[p]))
                      for p in (0, 1)]
        self.stranger = self.start_supernode(2, "", *secure, "--auth-key", str(keys[2]),
                                             "--no-worker")

    def overrides(self, name: str) -> list[str]:
        return ["runtime.kind=flower", f"runtime.superlink={CONNECTION}",
                f"run.out_dir={self.runs_dir}", f"run.name={name}"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("flower"))
    saved = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = fed.env["FLWR_HOME"]  # `fedbits run` in this process uses it
    try:
        fed.start_secure_superlink()
        fed.start_nodes()
        yield fed
    finally:
        fed.stop()
        if saved is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = saved


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "final").glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no final weights in {run_dir}"
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _run_log(caplog: pytest.LogCaptureFixture) -> None:
    """Keep fedbits' INFO records, the Flower run's streamed log among them: pytest shows
    them with a failing test."""
    caplog.set_level(logging.INFO, logger="fedbits")


def _run(example: Path, overrides: list[str]) -> Path:
    return run_experiment(load_config(example, SMALL + overrides))


def _flower_and_simulator(fed: Federation, example: Path, name: str,
                          extra: list[str]) -> tuple[Path, Path]:
    """The same run on Flower and, meanwhile in a thread, in the simulator."""
    sim_overrides = [f"run.out_dir={fed.tmp / 'sim-runs'}", f"run.name={name}", *extra]
    available_methods()  # load the registry here: fedbits.methods' first load is not thread-safe
    with ThreadPoolExecutor(1) as pool:
        sim = pool.submit(_run, example, sim_overrides)
        flower = _run(example, fed.overrides(name) + extra)
        return flower, sim.result()


def _assert_same_run(flower: Path, sim: Path) -> None:
    want, got = _weights(sim), _weights(flower)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs from the simulator's"
    # every message's payload bytes, in the same order
    assert (flower / "ledger.jsonl").read_text() == (sim / "ledger.jsonl").read_text()
    keys = ("clients", "rejected", "bytes_up", "bytes_down", "train_loss", "eval_loss")
    for a, b in zip(_rows(flower / "metrics.jsonl"), _rows(sim / "metrics.jsonl"), strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, a["round"]
    traffic = json.loads((flower / "flower.json").read_text())
    payload = sum(r["bytes"] for r in _rows(flower / "ledger.jsonl"))
    assert traffic["fedbits_payload_bytes"] == payload
    [flower_run] = traffic["flower_runs"]
    assert flower_run["status"] == "finished:completed"
    assert traffic["flower_total_bytes"] == flower_run["network_traffic"]["total-bytes"] > payload


@pytest.mark.e2e
def test_fedit_over_tls_matches_the_simulator(federation):
    _assert_same_run(*_flower_and_simulator(federation, TINY, "fedit", []))


@pytest.mark.e2e
def test_fedkseed_over_tls_matches_the_simulator(federation):
    flower, sim = _flower_and_simulator(federation, FEDKSEED, "fedkseed", ["clients.local_steps=8"])
    _assert_same_run(flower, sim)
    # the workers built this run's model once, at `prepare`; both rounds reused it
    for row in _rows(flower / "metrics.jsonl")[1:]:
        assert all(info["reused"] and info["setup_seconds"] == 0 for info in row["flower"].values())


@pytest.mark.e2e
@pytest.mark.parametrize("method", [
    m for m in available_methods() if m not in ("fedit", "fedkseed") and not m.startswith("test-")
])
def test_every_other_method_over_flower_matches_the_simulator(federation, method):
    """The conformance suite's Flower half (fedit and fedkseed have their own tests above):
    final weights, ledger and metrics equal the simulator's for the same config."""
    # one round (a Flower round costs 6-9 s of polling): stores across rounds and the
    # nodes' commits are exercised by the fedit and fedkseed runs above, at two rounds
    _assert_same_run(*_flower_and_simulator(
        federation, TINY, method,
        [f"method.name={method}", "clients.local_steps=2", "run.rounds=1"]))


@pytest.mark.e2e
def test_an_unregistered_supernode_is_refused(federation):
    assert federation.stranger is not None
    proc, log = federation.stranger
    assert proc.wait(START_TIMEOUT_S) == 2, log.read_text()[-3000:]
    text = log.read_text()
    assert "Failed to activate SuperNode" in text and "stopped (status" in text
    # the SuperLink refused it for its key, not for anything else
    superlink_log = (federation.tmp / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log


@pytest.mark.e2e
def test_a_worker_killed_mid_round_costs_only_its_reply(federation, caplog):
    node_log = federation.nodes[1][1]
    pid_file = federation.tmp / "node-1" / "worker.pid"
    killed: list[int] = []

    def kill_when_training(log: typing.IO[str]) -> None:  # as soon as round 1 starts on node 1
        deadline = time.monotonic() + 600
        seen = ""
        while time.monotonic() < deadline:
            seen = seen[-200:] + log.read()
            if "round 1: training partition 1" in seen:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.01)

    with node_log.open() as log:
        log.seek(0, os.SEEK_END)  # earlier runs trained round 1 too
        watcher = threading.Thread(target=kill_when_training, args=(log,), daemon=True)
        watcher.start()
        # enough local steps that the worker is still training when the watcher strikes
        run_dir = _run(TINY, federation.overrides("killed") + ["run.rounds=1",
                                                               "clients.local_steps=12"])
        watcher.join(5)
    assert killed, "the worker was never seen training round 1"

    r1 = _rows(run_dir / "metrics.jsonl")[1]
    assert r1["clients"] == [0, 1] and list(r1["rejected"]) == ["1"], caplog.text
    assert "died while serving" in r1["rejected"]["1"]
    assert r1["train_loss"] is not None  # client 0's update was aggregated
    ledger = [(r["round"], r["client"], r["direction"]) for r in _rows(run_dir / "ledger.jsonl")]
    assert ledger == [(1, 0, "down"), (1, 0, "up"), (1, 1, "down")]  # the missing reply
    assert (run_dir / "final" / "adapter_config.json").is_file()
    assert r1["flower"]["0"]["reused"]  # the other worker kept its model from `prepare`
    deadline = time.monotonic() + START_TIMEOUT_S
    while int(pid_file.read_text()) == killed[0]:  # the supervisor starts a new worker
        assert time.monotonic() < deadline, node_log.read_text()[-3000:]
        time.sleep(0.2)
    assert "restarting it" in node_log.read_text()


def _hostile_worker(root: Path, stop: threading.Event) -> threading.Thread:
    """What a data holder who turned hostile runs in place of fedbits' node worker,
    behind a real SuperNode and fedbits' real ClientApp: it answers ``prepare``
    honestly, so the server maps partition 2 to it, and every ``train`` with an
    ``info`` that is a JSON list instead of an object (and a junk uplink)."""
    key = secrets.token_bytes(32)
    write_new(root / worker.KEY, key, private=True)
    listener = Listener(str(root / worker.SOCKET), family="AF_UNIX", authkey=key)

    def serve() -> None:
        with listener:
            while True:
                with listener.accept() as conn:
                    if stop.is_set():
                        return
                    header = json.loads(conn.recv_bytes())
                    conn.recv_bytes()
                    train = header["op"] == "train"
                    info: object = ["not", "an", "object"] if train else {"pid": os.getpid()}
                    conn.send_bytes(json.dumps({"has_blob": train, "error": "", "stats": {},
                                                "info": info, "truncated": 0}).encode())
                    conn.send_bytes(b"junk" if train else b"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.e2e
def test_a_hostile_nodes_bad_reply_costs_only_its_round(federation):
    """A node whose reply's ``info`` is not a JSON object used to end the run
    ``finished:failed`` (``AttributeError`` in the ServerApp). Now its client is
    rejected with a reason naming the node, the others are aggregated and the run
    completes. The run also asks for ``run.out_dir`` elsewhere: the SuperLink writes it
    under its own runs directory and nothing is created where the run asked."""
    fed = federation
    root = fed.tmp / "hostile"
    root.mkdir()
    key = fed.tmp / "keys" / "hostile"
    fed.register([make_node_key(key)])
    stop = threading.Event()
    thread = _hostile_worker(root, stop)
    env = {**fed.env, "FLWR_HOME": str(root / "flwr-home"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), fed.env.get("PATH", "")]),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    argv = [flower_tool("flower-supernode"), "--superlink", fed.address,
            "--port", str(free_port()),
            "--node-config", str(NodeSettings(2, None, root, worker=True).write()),
            "--root-certificates", str(fed.tls / "ca.crt"),
            "--auth-supernode-private-key", str(key)]
    with (fed.tmp / "hostile.log").open("ab") as out:
        node = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    fed.procs.append(node)
    elsewhere = fed.tmp / "elsewhere"
    try:
        _run(TINY, fed.overrides("hostile") + ["data.num_clients=3", "clients.per_round=3",
                                               "run.rounds=1", f"run.out_dir={elsewhere}"])
    finally:
        fed.stop([node])
        stop.set()
        Client(str(root / worker.SOCKET), family="AF_UNIX",
               authkey=(root / worker.KEY).read_bytes()).close()  # wakes its accept()
        thread.join(10)

    assert not elsewhere.exists()
    run_dir = fed.runs_dir / "hostile"
    r1 = _rows(run_dir / "metrics.jsonl")[1]
    assert r1["clients"] == [0, 1, 2] and list(r1["rejected"]) == ["2"]
    reason = r1["rejected"]["2"]
    assert reason.startswith("SuperNode ") and "(partition 2): malformed node reply: " \
        "'stats' and 'info' must be JSON objects, 'info' is a list" in reason, reason
    assert r1["train_loss"] is not None  # clients 0 and 1 were aggregated
    assert set(r1["flower"]["2"]) == {"node_id", "seconds"}  # nothing of the node's info
    ledger = [(r["client"], r["direction"]) for r in _rows(run_dir / "ledger.jsonl")]
    assert (2, "down") in ledger and (2, "up") not in ledger
    assert (run_dir / "final" / "adapter_config.json").is_file()


def _examples(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"{path.stem} {i} + {i} =",
                                        "completion": f" {2 * i}"}) + "\n" for i in range(n)))
    return path


class _Watch(logging.Handler):
    """Sets :attr:`seen` once a record's message contains ``text``: a test waits on it for
    a line of the streamed run log (relayed by :mod:`fedbits.runtime.flower.launch`)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.INFO)
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.mark.e2e
def test_data_holders_own_their_data_and_their_client(federation, caplog):
    """Three nodes started with data of their own and pins, next to the demo nodes 0 and
    1: client 2 trains on its 7 examples; client 3 pins another method and refuses the
    run, its reason in the server's metrics and its own log; a node claiming client 2
    with another key (the operator bound client 2 to its holder's key ahead of contact)
    is refused, never trained, and the run goes on; the ServerApp opened its own
    evaluation set and none of the holders' files.

    The clinic (client 2's holder) starts only once the ServerApp has logged the
    intruder's refusal: until then the round waits for client 2, so the refusal is in
    the run's log whatever the order the nodes' first replies arrive in (a run that had
    every client mapped could end before the intruder's first reply was read)."""
    fed = federation
    holders = fed.tmp / "holders"
    data = {name: _examples(holders / f"{name}.jsonl", n)
            for name, n in (("clinic", 7), ("lab", 5), ("intruder", 9))}
    evaluation = _examples(fed.tmp / "server-eval" / "eval.jsonl", 4)
    keys = {name: fed.tmp / "keys" / f"holder-{name}" for name in data}
    public = {name: make_node_key(key) for name, key in keys.items()}
    ids = dict(zip(public, fed.register(list(public.values())), strict=True))
    # the SuperLink host's operator binds client 2 to the clinic's key (whatever bound it)
    assert fedbits_main(["flower", "holders", "--dir", str(fed.tmp / "superlink"),
                         "--bind", "2", str(public["clinic"])]) == 0
    secure = ("--root-certificates", str(fed.tls / "ca.crt"))
    pins = ("--allow-model", "tiny-llama", "--max-rounds", "3")
    started = {
        "lab": fed.start_node("holder-lab", "--client-id", "3", "--data", str(data["lab"]),
                              *pins, "--allow-method", "fedkseed", *secure,
                              "--auth-key", str(keys["lab"])),
        "intruder": fed.start_node("holder-intruder", "--client-id", "2", "--data",
                                   str(data["intruder"]), *pins, "--allow-method", "fedit",
                                   *secure, "--auth-key", str(keys["intruder"])),
    }
    refused = _Watch(f"SuperNode {ids['intruder']} (key ")
    relay = logging.getLogger("fedbits.runtime.flower.launch")
    relay.addHandler(refused)
    try:
        fed.wait_online([ids["lab"], ids["intruder"]])  # both are asked when the run starts
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(_run, TINY, fed.overrides("holders") + [
                "data.num_clients=4", "clients.per_round=4", "run.rounds=1",
                f"data.eval_source={evaluation}", f"runtime.node_wait_s={START_TIMEOUT_S:g}"])
            deadline = time.monotonic() + START_TIMEOUT_S
            while not refused.seen.wait(0.5):
                assert not running.done() and time.monotonic() < deadline, caplog.text[-3000:]
            started["clinic"] = fed.start_node(
                "holder-clinic", "--client-id", "2", "--data", str(data["clinic"]), *pins,
                "--allow-method", "fedit", *secure, "--auth-key", str(keys["clinic"]))
            run_dir = running.result()
    finally:
        relay.removeHandler(refused)
        fed.stop([proc for proc, _ in started.values()])

    r1 = _rows(run_dir / "metrics.jsonl")[1]
    assert r1["clients"] == [0, 1, 2, 3] and list(r1["rejected"]) == ["3"], caplog.text
    assert r1["rejected"]["3"] == (
        f"SuperNode {ids['lab']} cannot serve it: client 3 refuses this run: method.name "
        "'fedit' is not a method it allows (--allow-method: fedkseed)")
    assert r1["flower"]["2"]["node_id"] == ids["clinic"] and "eval_loss" in r1
    assert f"SuperNode {ids['clinic']} serves client 2 with 7 examples of its own" in caplog.text
    assert f"SuperNode {ids['intruder']} (key {public_key_file_fingerprint(public['intruder'])})" \
        " claims client 2, which is bound to another key" in caplog.text
    bound = Holders(fed.tmp / "superlink" / HOLDERS_FILE).read()
    assert bound[2].key == public_key_file_fingerprint(public["clinic"])
    assert bound[3].key == public_key_file_fingerprint(public["lab"])  # on first contact
    logs = {name: log.read_text() for name, (_, log) in started.items()}
    assert "round 1: training client 2" in logs["clinic"]
    assert "training" not in logs["intruder"], logs["intruder"][-3000:]
    assert "client 3 refuses this run: method.name 'fedit'" in logs["lab"]
    assert "shared-source demo" in (fed.tmp / "node-0.log").read_text()
    # the ServerApp process opened its own evaluation set, never a holder's file
    opened = fed.opens.read_text()
    assert f" {evaluation}\n" in opened
    assert str(holders) not in opened, opened


FOREIGN_APPS = '''\
"""Someone else's app: its ClientApp leaves a file on every node that runs it."""
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MARKS = Path({marks!r})
server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    messages = [Message(RecordDict({{"q": ConfigRecord({{"x": 1}})}}), dst_node_id=node,
                        message_type="query") for node in grid.get_node_ids()]
    for reply in grid.send_and_receive(messages, timeout=120):
        outcome = reply.error.reason if reply.has_error() else "ran"
        print(f"foreign app: node {{reply.metadata.src_node_id}}: {{outcome}}", flush=True)


@client.query()
def query(msg: Message, context: Context) -> Message:
    MARKS.mkdir(parents=True, exist_ok=True)
    (MARKS / str(context.node_id)).write_text("ran here")
    return Message(RecordDict(), reply_to=msg)
'''


def _foreign_app(root: Path, marks: Path) -> Path:
    """A Flower App of someone else's, with code of its own (not fedbits')."""
    (root / "foreign" / "foreign").mkdir(parents=True)
    (root / "foreign" / "foreign" / "__init__.py").write_text("")
    (root / "foreign" / "foreign" / "apps.py").write_text(FOREIGN_APPS.format(marks=str(marks)))
    (root / "foreign" / "pyproject.toml").write_text('''\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "foreign"
version = "1.0.0"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "someone-else"

[tool.flwr.app.components]
serverapp = "foreign.apps:server"
clientapp = "foreign.apps:client"
''')
    return root / "foreign"


@pytest.mark.e2e
def test_a_node_runs_only_apps_its_operator_signed(federation, caplog, monkeypatch):
    """A SuperNode started with the operator's trusted entities, next to the demo nodes 0
    and 1 (which check nothing): someone else's app, submitted through the Control API,
    runs its code on nodes 0 and 1 (it leaves a file there) and not on this one, which
    answers with the reason; a fedbits app signed with another key is refused the same
    way, its run going on without the node; the operator's signed run trains on it."""
    fed = federation
    # client 2's holder binding outlives runs (other tests bound it to their keys): the
    # host's operator releases it, here and afterwards, so this node's key can take it
    release = ["flower", "holders", "--dir", str(fed.tmp / "superlink"), "--release", "2"]
    assert fedbits_main(release) == 0
    operator, stranger = fed.tmp / "signing" / "operator", fed.tmp / "signing" / "stranger"
    _, trusted = make_signing_key(operator)
    make_signing_key(stranger)
    node_key = fed.tmp / "keys" / "signed-node"
    [node_id] = fed.register([make_node_key(node_key)])
    proc, log = fed.start_supernode(2, "signed", "--root-certificates", str(fed.tls / "ca.crt"),
                                    "--auth-key", str(node_key), "--trusted-entities", str(trusted))
    three = ["data.num_clients=3", "clients.per_round=3", "run.rounds=1"]
    marks = fed.tmp / "foreign-marks"
    try:
        fed.wait_online([node_id])
        foreign = subprocess.run(
            [flower_tool("flwr"), "run", str(_foreign_app(fed.tmp, marks)), CONNECTION,
             "--stream"], env=fed.env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        monkeypatch.setenv(SIGNING_KEY_ENV, str(stranger))
        other = _run(TINY, fed.overrides("signed-by-another") + three + ["runtime.node_wait_s=30"])
        monkeypatch.setenv(SIGNING_KEY_ENV, str(operator))
        signed = _run(TINY, fed.overrides("signed") + three)
    finally:
        fed.stop([proc])
        fedbits_main(release)

    node_log = log.read_text()
    out = foreign.stdout + foreign.stderr
    assert foreign.returncode == 0, out[-3000:]
    ran = {int(p.name) for p in marks.iterdir()}
    assert ran and node_id not in ran, out[-3000:]  # nodes 0 and 1 ran its code; this one not
    assert f"foreign app: node {node_id}: " in out and "carries no fedbits-signature" in out
    assert "refused: this node runs only apps signed by a key in its --trusted-entities" \
        in node_log

    r1 = _rows(other / "metrics.jsonl")[1]
    assert r1["clients"] == [0, 1, 2] and list(r1["rejected"]) == ["2"], caplog.text[-3000:]
    assert r1["train_loss"] is not None  # clients 0 and 1 trained: the run went on
    assert f"SuperNode {node_id} cannot serve this run: " in caplog.text
    assert "which is not in this node's --trusted-entities" in caplog.text

    r1 = _rows(signed / "metrics.jsonl")[1]
    assert r1["clients"] == [0, 1, 2] and not r1["rejected"], caplog.text[-3000:]
    assert r1["flower"]["2"]["node_id"] == node_id
    assert "signed by fedbits-" in node_log


@pytest.mark.e2e
def test_the_control_api_is_on_loopback_only(federation):
    """``fedbits flower superlink`` listens on 127.0.0.1 by default, so the Control API
    (submit apps, register node keys) is not reachable on this machine's other
    addresses (``tests/test_flower_cli.py`` checks that another ``--host`` is refused)."""
    argv = psutil.Process(federation.procs[0].pid).cmdline()  # the SuperLink itself (exec)
    assert argv[argv.index("--host") + 1] == "127.0.0.1", argv
    others = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback}
    if not others:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for address in others:
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((address, federation.port)) != 0, address
