"""fedavg vs partial (1/4 of the layers, int8 uplink) vs fedcybgd: bytes, memory, time, quality.

All three use ``examples/partial.toml``'s run, data and client settings
(``smollm2-135m``, ``builtin:tasks``, 10 clients, 2 per round, 4 local AdamW steps of
batch 4 at lr 1e-4, same seed, same rounds); ``partial`` with that file's method
section, ``fedcybgd`` with ``examples/fedcybgd.toml``'s, ``fedavg`` with its defaults.
Phases:

* ``runs``: each method's federated run (its own process): bytes up and down per
  client per round from the ledger, held-out eval loss at round 0 and after the last
  round.
* ``memory``: one client round of each method in a fresh process (round 1, fresh
  server): the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) just before
  the client reads its downlink and builds its half, so *client peak memory* = peak RSS
  − RSS before: the downlink, the client's model copy, gradients, optimizer state,
  activations and the uplink it encodes. glibc is told to give every tensor of 64 KiB
  or more its own mapping, so memory the server half freed is really gone and cannot
  be reused unseen by the client.
* ``cycle``: ``fedcybgd``'s change-only download over more than one full cycle (30
  layers at 2 clients per round is 15 rounds a cycle), with one local step of batch 1
  per client (bytes depend on the schedule and sampling, not on how hard a client
  trains); then a measured client round after it (as in ``memory``, with the main
  training settings), where downloads are largest.
* ``steps``: *seconds per local step* (forward, backward, AdamW step on one client
  batch) for each method's trainable set — all weights, partial's block, fedcybgd's
  bottom layer (backward through every layer) and top layer — in one process on one
  model, interleaved round-robin and reported as medians, so that every method sees
  the same contention on a shared machine.

Each phase replaces its part of ``bench/results/partial_cost.json`` and keeps the rest.

    python bench/partial_cost.py [--phases runs memory cycle steps] [--rounds 3]
                                 [--cycle-rounds 24] [--step-reps 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import torch

from fedbits.config import dumps_toml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

_RUN = r"""
import sys
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
run_experiment(load_config(sys.argv[1], sys.argv[2:]))
"""

_CLIENT = r"""
import gc, json, sys, time
import fedbits.methods._dense, fedbits.methods.fedcybgd, fedbits.methods.partial, fedbits.train
from fedbits.methods import ClientData, get_method
from fedbits.resolve import load_config
from fedbits.runtime.checkpoint import load_checkpoint
from fedbits.runtime.client import run_client
from fedbits.runtime.loop import CHECKPOINT, sample_clients
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.store import ClientStores
from fedbits.seeding import derive_seed
from fedbits.wire import Direction, seal

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB

seconds = []
def timed(*args, **kwargs):  # the local steps alone, whatever the method wraps around them
    start = time.perf_counter()
    out = fedbits.train.local_train(*args, **kwargs)
    seconds.append(time.perf_counter() - start)
    return out
for module in (fedbits.methods._dense, fedbits.methods.partial, fedbits.methods.fedcybgd):
    module.local_train = timed

from_checkpoint = sys.argv[1] == "checkpoint"
cfg = load_config(sys.argv[2], sys.argv[3:])
run_dir = cfg.run_dir
run_dir.mkdir(parents=True, exist_ok=True)
setup = prepare_run(cfg)
ctx = setup.method_context()
spec = get_method(cfg.method.name)
server = spec.server(ctx)
round_ = 1
if from_checkpoint:
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    server.load_state_dict(ckpt.server)
    round_ = ckpt.round + 1
    del ckpt
client = sample_clients(setup, round_)[0]
inbox = run_dir / "downlink.bin"  # the device receives it after the mark is reset
limit = setup.max_payload_bytes
inbox.write_bytes(seal(cfg.method.name, round_, Direction.DOWN, server.downlink(round_, client),
                       limit=limit, what="downlink"))  # sealed, as the runtime sends it
del server
gc.collect()
items, _ = setup.tokenize(setup.clients[client])
data = ClientData(items, setup.pad_id, derive_seed(cfg.run.seed, round_, client))
store = ClientStores(run_dir / "client_store").for_client(client, round_)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark to the current RSS
start = time.perf_counter()
down = inbox.read_bytes()
half = spec.client(ctx)
up = run_client(half, cfg.method.name, round_, client, down, data, store, limit).uplink
total = time.perf_counter() - start
print(json.dumps({
    "client_peak_mb": status("VmHWM") - before, "rss_before_mb": before,
    "seconds_per_local_step_this_round": seconds[0] / cfg.clients.local_steps,
    "client_round_seconds": total, "round": round_, "client": client,
    "down_bytes": len(down), "up_bytes": len(up),
}))
"""

# Every tensor of 64 KiB or more gets its own mapping, returned to the kernel when freed:
# without this, glibc's adaptive threshold keeps freed tensors of the server half in the
# heap, the client reuses them without RSS growing, and its peak is undercounted.
_EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


_STEPS = r"""
import json, statistics, sys, time
import torch
from fedbits.data.batching import iterate_batches
from fedbits.methods._blocks import decoder_layers, subset_from_options, train_only
from fedbits.resolve import load_config
from fedbits.runtime.setup import prepare_run
from fedbits.train import local_train, make_optimizer

reps = int(sys.argv[1])
cfg = load_config(sys.argv[2], sys.argv[3:])  # partial's config: its block is the real one
setup = prepare_run(cfg)
model = setup.build_model()
names = [n for n, _ in model.named_parameters()]
layers = decoder_layers(names)
block = subset_from_options(names, setup.method_context().options, seed=cfg.run.seed,
                            cohort=cfg.clients_per_round(), model_name=cfg.model.name).blocks[0]
trainable = {"fedavg": names, "partial": block, "fedcybgd_bottom_layer": layers[0],
             "fedcybgd_top_layer": layers[-1]}
items, _ = setup.tokenize(setup.clients[0])
batch = next(iterate_batches(items, cfg.clients.batch_size, 1, torch.Generator().manual_seed(0),
                             setup.pad_id))
optimizers = {}
def step(label):
    params = train_only(model, trainable[label])
    optimizer = optimizers.setdefault(label, make_optimizer(params, cfg.clients))
    start = time.perf_counter()
    local_train(model, [batch], optimizer)
    return time.perf_counter() - start
for label in trainable:
    step(label)  # warm-up; allocates the optimizer state
seconds = {label: [] for label in trainable}
for _ in range(reps):
    for label in trainable:
        seconds[label].append(step(label))
print(json.dumps({
    "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
    "all_seconds": seconds, "reps": reps, "batch_shape": list(batch["input_ids"].shape),
    "trainable_params": {
        k: sum(model.get_parameter(n).numel() for n in v) for k, v in trainable.items()
    },
}))
"""


def _child(
    code: str, config: Path, overrides: list[str], *first: str, env: dict | None = None
) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *first, str(config), *overrides],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return proc.stdout


def configs(out: Path, model: str) -> dict[str, Path]:
    """One TOML per method: partial.toml's settings, each method's own [method]."""
    base = tomllib.loads((REPO / "examples" / "partial.toml").read_text())
    cybgd = tomllib.loads((REPO / "examples" / "fedcybgd.toml").read_text())["method"]
    methods = {"fedavg": {"name": "fedavg"}, "partial": base["method"], "fedcybgd": cybgd}
    paths = {}
    for label, method in methods.items():
        raw = {**base, "method": method, "model": {**base["model"], "name": model},
               "run": {**base["run"], "name": label, "out_dir": str(out)}}
        paths[label] = out / f"{label}.toml"
        paths[label].write_text(dumps_toml(raw))
    return paths


def ledger(run_dir: Path) -> dict[str, list[dict]]:
    rows = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return {d: [r for r in rows if r["direction"] == d] for d in ("up", "down")}


def summarise(run_dir: Path) -> dict:
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    book = ledger(run_dir)
    per_round_down = {}
    for r in book["down"]:
        per_round_down.setdefault(r["round"], []).append(r["bytes"])
    return {
        "bytes_up_per_client_round": sum(r["bytes"] for r in book["up"]) / len(book["up"]),
        "bytes_down_per_client_round": sum(r["bytes"] for r in book["down"]) / len(book["down"]),
        "bytes_down_per_client_by_round": {
            r: sum(v) / len(v) for r, v in sorted(per_round_down.items())
        },
        "eval_loss_round_0": metrics[0]["eval_loss"],
        "eval_loss_final": metrics[-1]["eval_loss"],
        "rounds": metrics[-1]["round"],
        "rejected": sum(len(m["rejected"]) for m in metrics),
    }


def measure_client(config: Path, overrides: list[str], from_checkpoint: bool) -> dict:
    mode = "checkpoint" if from_checkpoint else "fresh"
    stdout = _child(_CLIENT, config, overrides, mode, env=_EXACT_RSS)
    return json.loads(stdout.strip().splitlines()[-1])


def cycle_downloads(config: Path, rounds: int, out: Path, layers: int) -> dict:
    """fedcybgd's change-only download over more than one cycle, cheap local training;
    then one measured client round with the main settings."""
    name = "run.name=fedcybgd-cycle"
    _child(_RUN, config, [f"run.rounds={rounds}", name, f"eval.every={rounds}",
                          "eval.metrics=['loss']", "eval.max_examples=8", "clients.local_steps=1",
                          "clients.batch_size=1", "clients.max_length=32"])
    book = ledger(out / "fedcybgd-cycle")
    per_round = max(1, len({r["client"] for r in book["down"] if r["round"] == 1}))
    cycle = -(-layers // per_round)
    after = [r["bytes"] for r in book["down"] if r["round"] > cycle]
    return {
        "rounds": rounds, "rounds_per_cycle": cycle,
        "down_bytes_per_client_after_first_cycle_mean": sum(after) / len(after) if after else None,
        "down_bytes_per_client_after_first_cycle_max": max(after) if after else None,
        "down_bytes_by_round_mean": {
            r: sum(x["bytes"] for x in book["down"] if x["round"] == r)
            / len([x for x in book["down"] if x["round"] == r])
            for r in sorted({x["round"] for x in book["down"]})
        },
        "settings": "as the main runs but 1 local step of batch 1, max_length 32",
        "client_after_cycle": measure_client(config, [name], from_checkpoint=True),
    }


def run_methods(paths: dict[str, Path], out: Path, rounds: int) -> dict[str, dict]:
    """Phase ``runs``: each method's federated run."""
    results = {}
    for label, path in paths.items():
        _child(_RUN, path,
               [f"run.rounds={rounds}", f"eval.every={rounds}", "eval.metrics=['loss']"])
        results[label] = summarise(out / label)
        print(label, json.dumps(results[label]), flush=True)
    return results


def model_figures(config: Path) -> dict[str, int]:
    from fedbits.methods._blocks import decoder_layers
    from fedbits.resolve import load_config
    from fedbits.runtime.setup import prepare_run

    base = prepare_run(load_config(config), lambda m: None).base_model
    return {"decoder_layers": len(decoder_layers([n for n, _ in base.named_parameters()])),
            "full_model_float32_bytes": 4 * sum(p.numel() for p in base.parameters())}


def summary(data: dict) -> dict:
    """The acceptance figures, from whatever phases the file holds."""
    out: dict = {}
    runs, full = data.get("results"), data.get("model", {}).get("full_model_float32_bytes")
    if runs:
        out["partial_uplink_fraction_of_fedavg"] = (
            runs["partial"]["bytes_up_per_client_round"]
            / runs["fedavg"]["bytes_up_per_client_round"])
        out["eval_loss_round_0_to_final"] = {
            k: [v["eval_loss_round_0"], v["eval_loss_final"]] for k, v in runs.items()}
    memory = data.get("memory")
    if memory:
        out["client_peak_mb"] = {k: v["client_peak_mb"] for k, v in memory.items()}
    cycle = data.get("fedcybgd_cycle")
    if cycle and full:
        out["fedcybgd_change_only_download_after_first_cycle_fraction_of_full_model"] = {
            "mean": cycle["down_bytes_per_client_after_first_cycle_mean"] / full,
            "max": cycle["down_bytes_per_client_after_first_cycle_max"] / full,
        }
        out["client_peak_mb"] = {
            **out.get("client_peak_mb", {}),
            "fedcybgd_after_first_cycle": cycle["client_after_cycle"]["client_peak_mb"],
        }
    if "steps" in data:
        out["seconds_per_local_step"] = data["steps"]["median_seconds"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", nargs="+", choices=["runs", "memory", "cycle", "steps"],
                   default=["runs", "memory", "cycle", "steps"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cycle-rounds", type=int, default=24)
    p.add_argument("--step-reps", type=int, default=3)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file = RESULTS / "partial_cost.json"
    data = json.loads(out_file.read_text()) if out_file.exists() else {}
    data.setdefault("commands", {})
    command = " ".join(["python", "bench/partial_cost.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        paths = configs(out, args.model)
        data["model"] = {"name": args.model, **model_figures(paths["fedavg"])}
        if "runs" in args.phases:
            data["results"] = run_methods(paths, out, args.rounds)
            data["settings"] = (
                f"examples/partial.toml run/data/clients, {args.rounds} rounds, "
                f"model {args.model}; "
                "partial: layer_fraction 0.25 top, uplink int8, server avg; fedcybgd: ascending, "
                "change-only download, float32 uplink; fedavg: float32 both ways")
        if "memory" in args.phases:
            data["memory"] = {label: measure_client(path, [], from_checkpoint=False)
                              for label, path in paths.items()}
        if "cycle" in args.phases:
            data["fedcybgd_cycle"] = cycle_downloads(paths["fedcybgd"], args.cycle_rounds, out,
                                                     data["model"]["decoder_layers"])
        if "steps" in args.phases:
            data["steps"] = json.loads(_child(_STEPS, paths["partial"], [], str(args.step_reps))
                                       .strip().splitlines()[-1])
    for phase in args.phases:
        data["commands"][phase] = command
    data["machine"] = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                       "torch": torch.__version__,
                       "note": "shared 2-core machine: timings are contended by other jobs"}
    data["summary"] = summary(data)
    out_file.write_text(json.dumps(data, indent=2))
    print(json.dumps(data["summary"], indent=2))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
