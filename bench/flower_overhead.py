"""What the Flower runtime costs per round beyond the clients' own work, on the tiny model.

Starts a SuperLink and two SuperNodes on 127.0.0.1 (``fedbits flower superlink`` /
``supernode``, no TLS) and measures, per round:

1. the floor: a trivial Flower App whose ClientApp echoes 100 bytes, once with
   Flower's ``Grid.send_and_receive`` (polls every 3 s) and once polling as often as
   fedbits' ServerApp does (``server_app.POLL_S``);
2. fedbits ``fedit`` on the tiny model over Flower with node workers: the round's
   wall time on the server, the clients' training time on the nodes, and the rest,
   which is the runtime's overhead; plus whether each node's worker kept the model
   (same pid, ``reused``, no set-up time after ``prepare``);
3. the same run with ``--no-worker`` SuperNodes, where every message rebuilds the
   model in a fresh ClientApp process, to show what the worker saves;
4. the same config in the in-process simulator, for the round time without a network.

Every process it starts is stopped by PID, with its descendants. Writes
bench/results/flower_overhead.json. Usage: python bench/flower_overhead.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is built offline

import flwr  # noqa: E402

from fedbits.logs import configure  # noqa: E402
from fedbits.resolve import load_config  # noqa: E402
from fedbits.runtime import run_experiment  # noqa: E402
from fedbits.runtime.flower.app import write_connection  # noqa: E402
from fedbits.runtime.flower.launch import flower_tool  # noqa: E402
from fedbits.runtime.flower.local import LocalProcesses  # noqa: E402
from fedbits.runtime.flower.server_app import POLL_S  # noqa: E402

OUT = REPO / "bench" / "results" / "flower_overhead.json"
# the SuperNodes are the shared-source demo (partitions of builtin:tasks, as the simulator
# splits it); the server evaluates on a set of its own, as a deployment's server does
CONFIG = ["data.num_clients=2", "clients.per_round=2", "eval.every=1000", "eval.metrics=['loss']",
          "eval.max_examples=4", "data.eval_source=builtin:tasks"]

TRIVIAL_APP = '''
import json, time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def echo(msg: Message, context: Context) -> Message:
    blob = msg.content["r"]["blob"]
    return Message(RecordDict({"r": ConfigRecord({"blob": blob})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = []
    while len(nodes) < 2:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.2)
    times = []
    for _ in range(int(cfg["rounds"])):
        start = time.monotonic()
        msgs = [Message(RecordDict({"r": ConfigRecord({"blob": b"x" * 100})}), dst_node_id=n,
                        message_type="train") for n in nodes]
        if cfg["poll"] == "send_and_receive":
            replies = list(grid.send_and_receive(msgs))
        else:
            ids, replies = set(grid.push_messages(msgs)), []
            while ids:
                for m in grid.pull_messages(ids):
                    ids.discard(m.metadata.reply_to_message_id)
                    replies.append(m)
                time.sleep(float(cfg["poll_s"]))
        assert all(m.has_content() for m in replies)
        times.append(time.monotonic() - start)
    with open(cfg["out"], "w") as f:
        json.dump(times, f)
'''

TRIVIAL_PYPROJECT = '''
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "trivial"
version = "1.0.0"
description = "echo 100 bytes: the floor of a Flower round"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedbits-bench"

[tool.flwr.app.components]
serverapp = "trivial_app:server"
clientapp = "trivial_app:client"

[tool.flwr.app.config]
rounds = 3
poll = "send_and_receive"
poll_s = 0.5
out = ""
'''


class Cluster(LocalProcesses):
    """An insecure SuperLink and SuperNodes started by this script, stopped by PID."""

    def superlink(self) -> None:
        self.start_superlink("--insecure")
        os.environ["FLWR_HOME"] = self.env["FLWR_HOME"]
        write_connection("bench", self.address, insecure=True)

    def nodes(self, tag: str, *extra: str) -> list[subprocess.Popen]:
        return [self.start_supernode(p, tag, "--insecure", *extra)[0] for p in (0, 1)]

    def wait_online(self, count: int) -> None:
        while True:
            argv = [flower_tool("flwr"), "supernode", "ls", "bench", "--format", "json"]
            out = subprocess.run(argv, env=self.env, capture_output=True, text=True).stdout
            try:
                nodes = json.loads(out[out.find("{"):]).get("nodes", [])
            except ValueError:
                nodes = []
            if sum(1 for n in nodes if n.get("status") == "online") >= count:
                return
            time.sleep(1)


def trivial_floor(cluster: Cluster, rounds: int, poll: str) -> list[float]:
    app = cluster.tmp / "trivial"
    app.mkdir(exist_ok=True)
    (app / "pyproject.toml").write_text(TRIVIAL_PYPROJECT)
    (app / "trivial_app.py").write_text(TRIVIAL_APP)
    out = cluster.tmp / f"trivial-{poll}.json"
    run = subprocess.run([flower_tool("flwr"), "run", str(app), "bench", "--stream", "--run-config",
                          f'rounds={rounds} poll="{poll}" poll_s={POLL_S} out="{out}"'],
                         env=cluster.env, capture_output=True, text=True)
    if not out.is_file():
        raise SystemExit(f"trivial app failed:\n{run.stdout}\n{run.stderr}")
    return json.loads(out.read_text())


def fedbits_rounds(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = []
    for row in rows[1:]:
        nodes = row.get("flower", {})
        compute = max((n.get("train_seconds", 0.0) for n in nodes.values()), default=0.0)
        setup = max((n.get("setup_seconds", 0.0) for n in nodes.values()), default=0.0)
        out.append({
            "round": row["round"],
            "round_seconds": row["train_seconds"],  # sample .. aggregate, on the server
            "max_client_train_seconds": compute,
            "max_client_setup_seconds": setup,
            "overhead_seconds": row["train_seconds"] - compute - setup,
            "nodes": {c: {k: n.get(k) for k in ("pid", "reused", "setup_seconds", "train_seconds",
                                                   "sessions_built", "seconds")}
                      for c, n in nodes.items()},
        })
    return out


def summary(rounds: list[dict]) -> dict:
    later = rounds[1:] or rounds  # round 1 may still be waiting for a node's first load
    return {k: statistics.mean(r[k] for r in later)
            for k in ("round_seconds", "max_client_train_seconds", "max_client_setup_seconds",
                      "overhead_seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    configure()  # each run's progress lines, as `fedbits run` shows them
    load_start = os.getloadavg()
    result: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_at_start": load_start},
        "flwr": flwr.__version__, "rounds": args.rounds, "config": ["examples/tiny.toml", *CONFIG],
    }
    with tempfile.TemporaryDirectory(prefix="fedbits-bench-") as tmp_name:
        tmp = Path(tmp_name)
        cluster = Cluster(tmp)
        try:
            cluster.superlink()
            workers = cluster.nodes("worker")
            cluster.wait_online(2)
            for poll in ("send_and_receive", "poll"):
                result[f"trivial_{poll}_seconds"] = trivial_floor(cluster, args.rounds, poll)
            overrides = [*CONFIG, f"run.rounds={args.rounds}", f"run.out_dir={tmp / 'runs'}",
                         "runtime.kind=flower", "runtime.superlink=bench"]
            with_worker = run_experiment(load_config(REPO / "examples" / "tiny.toml",
                                                     overrides + ["run.name=worker"]))
            result["fedbits_with_worker"] = fedbits_rounds(with_worker)
            traffic = json.loads((with_worker / "flower.json").read_text())
            result["fedbits_with_worker_traffic"] = traffic
            cluster.stop(workers)
            cluster.nodes("noworker", "--no-worker")
            cluster.wait_online(2)
            no_worker = run_experiment(load_config(REPO / "examples" / "tiny.toml",
                                                   overrides + ["run.name=noworker"]))
            result["fedbits_without_worker"] = fedbits_rounds(no_worker)
        finally:
            cluster.stop()
        sim = run_experiment(load_config(REPO / "examples" / "tiny.toml", [
            *CONFIG, f"run.rounds={args.rounds}", f"run.out_dir={tmp / 'runs'}", "run.name=sim"]))
        sim_rows = [json.loads(line) for line in (sim / "metrics.jsonl").read_text().splitlines()]
        result["simulator_round_seconds"] = [r["train_seconds"] for r in sim_rows[1:]]
    floor = statistics.mean(result["trivial_send_and_receive_seconds"])
    floor_fast = statistics.mean(result["trivial_poll_seconds"])
    result["summary"] = {
        "trivial_floor_send_and_receive_s": floor,
        f"trivial_floor_poll_{POLL_S:g}s_s": floor_fast,
        "with_worker": summary(result["fedbits_with_worker"]),
        "without_worker": summary(result["fedbits_without_worker"]),
        "simulator_round_s": statistics.mean(result["simulator_round_seconds"]),
        "model_loaded_once_per_node": all(
            n["reused"] and n["setup_seconds"] == 0 and n["sessions_built"] == 1
            for r in result["fedbits_with_worker"] for n in r["nodes"].values()),
        "worker_pids_per_node": sorted({(c, n["pid"]) for r in result["fedbits_with_worker"]
                                        for c, n in r["nodes"].items()}),
    }
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
