"""Each data holder owns its data and decides what it accepts; a node is its key.

- A node's settings (its client, its own data, its pins) come from its node config,
  checked key by key: hostile or mistaken values are refused naming the key, and the
  file ``fedbits flower supernode`` writes reads back the same through Flower's own
  reader.
- A node checks a run's config as hostile input: bounded, its structure read before
  anything it names is looked up, refused (every reason in one message) for a model,
  method, round count or payload size the holder did not pin, and for a pinned model
  whose weights changed on disk.
- A shared-source demo node trains on exactly the simulator's partition.
- The SuperLink side binds a client to the key of the first node that claims it; a
  second key is refused, the binding survives a restart of the server, and the
  host's operator can bind ahead of first contact or release a binding.
- The real ServerApp ``main``, driven over an in-process Grid whose nodes run the real
  ClientApp, trains a node's own data, records another node's refusal in the metrics,
  refuses a node that claims a bound client, weighs the sample count the node counted,
  and never opens a client's data file, even the one the run names as ``data.source``
  (an audit hook on ``open`` in this process, paused while the nodes answer).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.config import parse_config_args
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supercore.task_identity import TaskIdentity

from fedbits.cli import main as fedbits_main
from fedbits.config import ModelSection
from fedbits.errors import FedbitsError
from fedbits.models import load_model
from fedbits.resolve import config_toml, load_config
from fedbits.runtime.flower import client_app, server_app
from fedbits.runtime.flower.certs import make_node_key
from fedbits.runtime.flower.holder import (
    MAX_CONFIG_CHARS,
    ModelPin,
    NodeSettings,
    Pins,
    RunRefused,
    accept_run,
    weights_sha256,
)
from fedbits.runtime.flower.identity import (
    HOLDERS_FILE,
    Holders,
    key_fingerprint,
    public_key_file_fingerprint,
)
from fedbits.runtime.flower.processes import RUNS_DIR_ENV
from fedbits.runtime.flower.protocol import CONFIG_KEY, RESUME_KEY, NodeReply, Request
from fedbits.runtime.setup import prepare_run, shared_partition
from fedbits.wire import Direction, Reader, open_envelope

from conftest import TINY

# -- a node's settings ---------------------------------------------------------------

HOLDER: dict[str, Any] = {"client-id": 3, "fedbits-data": "/data/notes.jsonl",
                          "fedbits-allow-model": "tiny-llama", "fedbits-allow-method": "fedit"}


@pytest.mark.parametrize("change, culprit", [
    ({"client-id": None}, "exactly one of client-id"),
    ({"partition-id": 1}, "exactly one of client-id"),
    ({"client-id": -1}, "client-id must be an integer in 0..2147483647, got -1"),
    ({"client-id": True}, "client-id must be an integer"),
    ({"client-id": "3"}, "client-id must be an integer"),
    ({"client-id": 2**31}, "client-id must be an integer"),
    ({"fedbits-data": None}, "fedbits-data must name this data holder's data"),
    ({"fedbits-data": "  "}, "fedbits-data must name this data holder's data"),
    ({"fedbits-allow-model": None}, "must say which models and methods it accepts"),
    ({"fedbits-allow-method": "\n \n"}, "must say which models and methods it accepts"),
    ({"fedbits-allow-method": 7}, "fedbits-allow-method must be a string"),
    ({"fedbits-allow-models": "x"}, "unknown key 'fedbits-allow-models'"),
    ({"fedbits-max-rounds": 0}, "fedbits-max-rounds must be an integer in 1.."),
    ({"fedbits-max-rounds": False}, "fedbits-max-rounds must be an integer"),
    ({"fedbits-max-payload-mb": float("nan")}, "fedbits-max-payload-mb must be a positive"),
    ({"fedbits-max-payload-mb": -1}, "fedbits-max-payload-mb must be a positive"),
    ({"fedbits-max-payload-mb": "10"}, "fedbits-max-payload-mb must be a positive"),
    ({"fedbits-worker": "yes"}, "fedbits-worker must be true or false"),
    ({"fedbits-dir": ""}, "fedbits-dir must be a directory path"),
    ({"fedbits-allow-model": "/m@sha256:abc"}, "'abc' is not a sha256"),
    ({"fedbits-allow-model": "HuggingFaceTB/SmolLM2-135M@sha256:" + "0" * 64},
     "a sha256 pins the weights of a local path"),
])
def test_a_bad_node_config_is_refused_naming_the_key(change: dict[str, Any], culprit: str) -> None:
    config = {k: v for k, v in {**HOLDER, **change}.items() if v is not None}
    with pytest.raises(FedbitsError) as err:
        NodeSettings.from_node_config(config)
    assert culprit in str(err.value)


def test_the_demo_takes_no_data_and_accepts_anything_unpinned(tmp_path: Path) -> None:
    with pytest.raises(FedbitsError, match="fedbits-data goes with client-id"):
        NodeSettings.from_node_config({"partition-id": 1, "fedbits-data": "/d.jsonl"})
    demo = NodeSettings.from_node_config({"partition-id": 1})
    assert demo.shared and demo.pins == Pins() and demo.client == 1
    assert demo.root == Path.home() / ".fedbits" / "flower-node" / "partition-1"
    assert NodeSettings.from_node_config(HOLDER).root.name == "client-3"


def test_the_written_node_config_reads_back_through_flowers_reader(tmp_path: Path) -> None:
    """Flower's node config holds scalars only: the pins are one string, a pin a line."""
    settings = NodeSettings.from_node_config({
        **HOLDER, "fedbits-dir": str(tmp_path), "fedbits-worker": True,
        "fedbits-allow-model": "tiny-llama\n/models/llama@sha256:" + "ab" * 32,
        "fedbits-allow-method": "fedit\nfedkseed", "fedbits-max-rounds": 7,
        "fedbits-max-payload-mb": 12.5})
    path = settings.write()
    flower_view = parse_config_args([str(path)])  # what flower-supernode hands the ClientApp
    assert NodeSettings.from_node_config(flower_view) == settings == NodeSettings.load(tmp_path)
    assert settings.pins.models[1] == ModelPin("/models/llama", "ab" * 32)
    assert settings.pins.methods == ("fedit", "fedkseed")


# -- a node's check of a run -----------------------------------------------------------


def _run_config(*overrides: str) -> str:
    return config_toml(load_config(TINY, ["runtime.kind=flower", *overrides]))


def _holder(tmp_path: Path, **pins: Any) -> NodeSettings:
    return NodeSettings(3, str(tmp_path / "mine.jsonl"), tmp_path / "node",
                        pins=Pins(**{"models": (ModelPin("tiny-llama"),),
                                     "methods": ("fedit",), **pins}))


def test_a_node_refuses_what_its_holder_did_not_pin_naming_every_field(tmp_path: Path) -> None:
    holder = _holder(tmp_path, max_rounds=3)
    assert accept_run(_run_config("run.rounds=3"), holder).model.name == "tiny-llama"
    text = _run_config("model.name=random:llama", "method.name=fedkseed", "run.rounds=4")
    with pytest.raises(RunRefused) as err:
        accept_run(text, holder)
    assert str(err.value) == (
        "client 3 refuses this run: model.name 'random:llama' is not a model it allows "
        "(--allow-model: tiny-llama); method.name 'fedkseed' is not a method it allows "
        "(--allow-method: fedit); run.rounds=4 is over its --max-rounds=3")
    # a hostile name is quoted and cut in the message (the node's log, the server's)
    text = _run_config("model.name=random:llama").replace("random:llama", "x\\n" * 100)
    with pytest.raises(RunRefused) as err:
        accept_run(text, holder)
    assert "model.name 'x\\nx" in str(err.value) and "\n" not in str(err.value)
    assert len(str(err.value)) < 400


def test_a_path_the_run_names_is_not_looked_up_unless_pinned(tmp_path: Path) -> None:
    """A pinned node refuses an unknown path for the pin, before looking at the path (the
    reply would tell the server what exists on the node); a demo node without pins looks
    it up, as ``fedbits run`` would."""
    secret = tmp_path / "secret-model"
    text = config_toml(load_config(TINY, ["runtime.kind=flower"])).replace(
        'name = "tiny-llama"', f'name = "{secret}"')
    with pytest.raises(RunRefused, match="is not a model it allows"):
        accept_run(text, _holder(tmp_path))
    with pytest.raises(FedbitsError, match="model directory not found"):
        accept_run(text, NodeSettings(0, None, tmp_path))


@pytest.mark.parametrize("text, culprit", [
    (_run_config() + "#" * MAX_CONFIG_CHARS, f"over {MAX_CONFIG_CHARS:,}"),
    ("[run\nname = 1", "not valid TOML"),
    ("[model]\nname = 'tiny-llama'\nrevision = 3\n", "model.revision"),
    ("[nodes]\nsteal = true\n", "nodes: unknown key"),
])
def test_a_malformed_run_config_is_an_error_naming_it(tmp_path: Path, text: str,
                                                      culprit: str) -> None:
    with pytest.raises(FedbitsError) as err:
        accept_run(text, _holder(tmp_path))
    assert culprit in str(err.value)
    assert "fedbits.toml" not in str(err.value)  # named as the run config, not a temp file


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = load_model(ModelSection(name="tiny-llama"))
    path = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(path)
    return path


def test_a_hash_pin_holds_the_weights_on_disk(tmp_path: Path, saved_model: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The documented recipe gives the same sha256; a changed weights file is refused."""
    listing = subprocess.run("LC_ALL=C sha256sum *.safetensors | sha256sum", shell=True,
                             cwd=saved_model, capture_output=True, text=True, check=True)
    digest = weights_sha256(saved_model)
    assert listing.stdout.split()[0] == digest
    assert fedbits_main(["flower", "model-pin", str(saved_model)]) == 0
    assert capsys.readouterr().out.strip() == f"--allow-model {saved_model}@sha256:{digest}"

    text = config_toml(load_config(TINY, ["runtime.kind=flower", f"model.name={saved_model}"]))
    pinned = _holder(tmp_path, models=(ModelPin(str(saved_model), digest),))
    assert accept_run(text, pinned).model.name == str(saved_model)
    weights = next(saved_model.glob("*.safetensors"))
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        changed = f"have sha256 [0-9a-f]{{64}}, not the pinned {digest}"
        with pytest.raises(RunRefused, match=changed):
            accept_run(text, pinned)
    finally:
        weights.write_bytes(original)


def test_the_demos_partition_is_the_simulators(tmp_path: Path) -> None:
    """A shared-source demo node trains on the simulator's partition, and does not need
    the server's ``data.eval_source`` to find it."""
    for extra in ([], ["data.eval_source=builtin:tasks"]):
        cfg = load_config(TINY, ["data.num_clients=3", *extra])
        simulator = prepare_run(cfg).clients
        cfg.data.eval_source = cfg.data.eval_source and str(tmp_path / "not-on-this-node")
        assert [shared_partition(cfg, i) for i in range(3)] == simulator


# -- the SuperLink's bindings ------------------------------------------------------------


def test_a_client_is_bound_to_the_first_key_that_claims_it(tmp_path: Path) -> None:
    holders = Holders(tmp_path / HOLDERS_FILE)
    assert holders.claim(0, "sha256:a", 11) is None  # first contact binds
    assert holders.claim(0, "sha256:a", 12) is None  # the same key, a new node ID
    refusing = holders.claim(0, "sha256:b", 13)
    assert refusing is not None and (refusing.key, refusing.node) == ("sha256:a", 12)
    again = Holders(tmp_path / HOLDERS_FILE)  # a restarted server reads the same file
    assert again.claim(0, "sha256:b", 13) is not None and again.read()[0].key == "sha256:a"
    assert again.release(0) is not None and again.claim(0, "sha256:b", 13) is None
    assert again.bind(0, "sha256:c") is not None and again.claim(0, "sha256:b", 13) is not None


def test_racing_claims_bind_one_key(tmp_path: Path) -> None:
    holders = Holders(tmp_path / HOLDERS_FILE)
    results: dict[int, object] = {}

    def claim(i: int) -> None:
        results[i] = Holders(holders.path).claim(5, f"sha256:{i}", i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, refused in results.items() if refused is None]
    assert len(winners) == 1 and holders.read()[5].key == f"sha256:{winners[0]}"


@pytest.mark.parametrize("text", ["{", '{"holders": []}', '{"holders": {"x": {}}}'])
def test_damaged_bindings_stop_the_server_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / HOLDERS_FILE
    path.write_text(text)
    with pytest.raises(FedbitsError, match=f"bindings {path} are damaged"):
        Holders(path).claim(0, "sha256:a", 1)


def test_the_operators_binding_matches_the_key_flower_reports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fedbits flower holders --bind`` reads the node's ``.pub`` file; the ServerApp sees
    the key as Flower's NodeInfo carries it (PEM): one key, one fingerprint."""
    public = make_node_key(tmp_path / "node-key")
    flower_bytes = public_key_to_bytes(load_ssh_public_key(public.read_bytes()))  # type: ignore[arg-type]
    assert public_key_file_fingerprint(public) == key_fingerprint(flower_bytes)
    assert key_fingerprint(flower_bytes) != key_fingerprint(
        public_key_to_bytes(load_ssh_public_key(make_node_key(tmp_path / "other").read_bytes())))  # type: ignore[arg-type]

    assert fedbits_main(["flower", "holders", "--dir", str(tmp_path), "--bind", "2",
                         str(public)]) == 0
    out = capsys.readouterr().out
    assert f"client 2 is bound to {public}" in out and "not seen yet" in out
    assert Holders(tmp_path / HOLDERS_FILE).claim(2, key_fingerprint(flower_bytes), 9) is None
    assert fedbits_main(["flower", "holders", "--dir", str(tmp_path), "--release", "2"]) == 0
    assert "released" in capsys.readouterr().out and not Holders(tmp_path / HOLDERS_FILE).read()
    assert fedbits_main(["flower", "holders", "--dir", str(tmp_path), "--bind", "x",
                         str(public)]) == 2
    assert "--bind CLIENT: 'x' is not a non-negative integer" in capsys.readouterr().err


# -- the ServerApp over an in-process Grid ------------------------------------------------


class Opens:
    """Every file this process opens while recording, except while the nodes answer (an
    audit hook stays for the life of the process, so it only ever appends to a list)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.recording = False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.recording and event == "open" and isinstance(args[0], str | Path):
            self.paths.append(str(args[0]))

    @contextmanager
    def paused(self) -> Iterator[None]:
        was, self.recording = self.recording, False
        try:
            yield
        finally:
            self.recording = was


OPENS = Opens()


def _flower_key(directory: Path) -> bytes:
    """A new node key pair in ``directory``; its public key as Flower's NodeInfo has it."""
    public = make_node_key(directory / "key").read_bytes()
    return public_key_to_bytes(load_ssh_public_key(public))  # type: ignore[arg-type]


class InProcessGrid:
    """The SuperLink as the ServerApp sees it: nodes with keys, and a reply from
    ``answer(node, message)`` the moment a message is pushed."""

    def __init__(self, keys: dict[int, bytes],
                 answer: Callable[[int, Message], Message]) -> None:
        self.keys = keys
        self.answer = answer
        self.received: dict[int, list[str]] = {n: [] for n in keys}
        self._replies: dict[str, Message] = {}
        self._sent = 0

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=key) for n, key in self.keys.items()]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self._sent += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._sent}"  # the SuperLink names it
            node = msg.metadata.dst_node_id
            self.received[node].append(msg.metadata.message_type)
            self._replies[msg.metadata.message_id] = self.answer(node, msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ServerApp process before ``main`` creates messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_the_first_key_to_claim_a_client_keeps_it(tmp_path: Path, task_identity: None,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The directory binds a client on the first claim, refuses a second key for it,
    binds a client whose node refused the run (its refusal is the client's), and binds
    nothing for a claim outside the run's clients or a transport error."""
    replies = {1: NodeReply(partition=0), 2: NodeReply(partition=0),
               3: NodeReply(error="client 7 refuses this run: it has 4 clients", partition=7),
               4: NodeReply(error="client 1 refuses this run: method.name 'x'", partition=1)}

    def answer(node: int, msg: Message) -> Message:
        if node == 5:
            return Message(Error(code=2, reason="Node Unavailable"), reply_to=msg)
        return Message(replies[node].to_content(), reply_to=msg)

    keys = {n: _flower_key(tmp_path / f"n{n}") for n in (1, 2, 3, 4, 5)}
    holders = Holders(tmp_path / HOLDERS_FILE)
    directory = server_app.NodeDirectory(InProcessGrid(keys, answer), "store", holders, 4)
    caplog.set_level(logging.INFO, logger="fedbits")
    assert directory.wait_for({0, 1, 2}, timeout=0) == {0: 1}
    assert directory.failed == {1: "SuperNode 4 cannot serve it: client 1 refuses this run: "
                                   "method.name 'x'"}
    assert {c: b.key for c, b in holders.read().items()} == {
        0: key_fingerprint(keys[1]), 1: key_fingerprint(keys[4])}
    assert "SuperNode 2 (key sha256:" in caplog.text and "SuperNode 1, since" in caplog.text
    assert "SuperNode 3 cannot serve this run: client 7 refuses" in caplog.text
    assert "SuperNode 5 cannot serve this run: SuperNode 5: Node Unavailable" in caplog.text


def _write_examples(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"{path.stem} {i} + {i} =",
                                        "completion": f" {2 * i}"}) + "\n" for i in range(n)))
    return path


def test_the_server_app_trains_holders_own_data_and_never_opens_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        task_identity: None, one_thread: None) -> None:
    """Node 11 holds client 0's data, node 12 client 1's but pins another method, node 13
    claims client 0 with its own key after node 11: one round trains node 11's examples,
    rejects client 1 with node 12's reason, and never asks node 13 to train."""
    holders = tmp_path / "holders"
    mine, theirs, hijacker = (_write_examples(holders / f"{name}.jsonl", n)
                              for name, n in (("mine", 7), ("theirs", 5), ("hijacker", 9)))
    evaluation = _write_examples(tmp_path / "server" / "eval.jsonl", 4)

    def node(client: int, data: Path, methods: str, name: str) -> dict[str, Any]:
        (tmp_path / name).mkdir()
        return {"client-id": client, "fedbits-data": str(data), "fedbits-dir": str(tmp_path / name),
                "fedbits-allow-model": "tiny-llama", "fedbits-allow-method": methods}

    nodes = {11: node(0, mine, "fedit", "n11"), 12: node(1, theirs, "fedkseed", "n12"),
             13: node(0, hijacker, "fedit", "n13")}  # claims client 0, after node 11
    uplinks: dict[int, bytes] = {}

    def client_app_answers(node: int, msg: Message) -> Message:
        """The node's real ClientApp, no worker, with its own node config."""
        context = Context(run_id=1, node_id=node, node_config=nodes[node],
                          state=RecordDict(), run_config=run_config)
        op = "train" if msg.metadata.message_type == "train" else "prepare"
        with OPENS.paused():
            reply: Message = getattr(client_app, op)(msg, context)
        blob = reply.content.config_records["fedbits"].get("blob")
        if isinstance(blob, bytes):
            uplinks[node] = blob
        return reply

    # the run names a holder's file as its data.source: a server that loaded it would open it
    cfg = load_config(TINY, ["runtime.kind=flower", "run.name=owned", "run.rounds=1",
                             f"data.source={mine}", f"data.eval_source={evaluation}",
                             "data.num_clients=2", "clients.per_round=2", "clients.local_steps=2",
                             "eval.metrics=['loss']", "runtime.node_wait_s=5"])
    run_config = {CONFIG_KEY: config_toml(cfg), RESUME_KEY: False}
    grid = InProcessGrid({n: _flower_key(Path(c["fedbits-dir"])) for n, c in nodes.items()},
                         client_app_answers)
    monkeypatch.setenv(RUNS_DIR_ENV, str(tmp_path / "runs"))
    caplog.set_level(logging.INFO, logger="fedbits")
    OPENS.paths.clear()
    OPENS.recording = True
    try:
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                      run_config=run_config))  # type: ignore[arg-type]
    finally:
        OPENS.recording = False

    run_dir = tmp_path / "runs" / "owned"
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()][1]
    assert row["clients"] == [0, 1] and list(row["rejected"]) == ["1"]
    assert row["rejected"]["1"] == (
        "SuperNode 12 cannot serve it: client 1 refuses this run: method.name 'fedit' is not "
        "a method it allows (--allow-method: fedkseed)")
    assert row["flower"]["0"]["node_id"] == 11 and "eval_loss" in row
    # the hijacker was refused, never sent a round, and its data never trained
    assert grid.received[13] == ["query"] and grid.received[11] == ["query", "train"]
    bound = json.loads((run_dir / HOLDERS_FILE).read_text())["holders"]
    assert bound["0"]["key"] == key_fingerprint(grid.keys[11]) and bound["0"]["node"] == 11
    assert f"SuperNode 13 (key {key_fingerprint(grid.keys[13])}) claims client 0, which is " \
           "bound to another key" in caplog.text
    # the sample count in the uplink is the node's own count of its data
    body = open_envelope(uplinks[11], method="fedit", round_=1, direction=Direction.UP,
                         limit=10**9, what="test")
    assert Reader(body, "test").u32("num_samples") == 7
    # the server opened its evaluation set, and none of the holders' files
    assert str(evaluation) in OPENS.paths
    assert not [p for p in OPENS.paths if str(holders) in p], OPENS.paths


def test_a_node_refuses_a_round_past_the_run_it_accepted(tmp_path: Path, one_thread: None) -> None:
    from fedbits.runtime.flower.node import NodeHost

    settings = NodeSettings(0, str(_write_examples(tmp_path / "d.jsonl", 3)), tmp_path / "node",
                            pins=Pins((ModelPin("tiny-llama"),), ("fedit",)))
    host = NodeHost(settings)
    text = _run_config("run.rounds=2")
    prepared = host.handle("prepare", text, Request("s"))
    assert not prepared.error and prepared.info["samples"] == 3 and prepared.info["data"] == "own"
    reply = host.handle("train", text, Request("s", 3, 0, 2, b"x"))
    assert reply.error == "round 3 is outside the run's run.rounds=2 this node accepted"

    capped = NodeHost(NodeSettings(0, settings.data, tmp_path / "node", pins=Pins(
        settings.pins.models, settings.pins.methods, max_payload_mb=1e-3)))
    reply = capped.handle("train", text, Request("s", 1, 0, 0, b"x" * 1001))
    assert reply.error == ("downlink to client 0: 1001 bytes is over this node's "
                           "--max-payload-mb (1000 bytes)")
