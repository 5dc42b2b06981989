"""One federated round per method and model: bytes per client, seconds, peak RSS.

Each (method, model) pair runs in its own process so peak RSS is its own. The peak
is the resident-memory high-water mark over two training rounds, reset after set-up
(Linux ``/proc/self/clear_refs``) and with no evaluation, divided by the model's
float32 bytes: what a round costs on top of nothing, Python and torch included
(about 0.4 GB, 0.75 of smollm2-135m). Writes ``bench/results/round_cost.json``
with the issue-15 targets. Not a test: numbers, not assertions.

    python bench/round_cost.py                      # all methods, tiny + smollm2-135m
    python bench/round_cost.py --models tiny-llama --methods fedit
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
TARGETS = {"fedit": 3.0, "flasc": 3.2, "fedavg": 6.5}
"""Issue 15: round peak RSS / fp32 model bytes on smollm2-135m (was 7.2, -, 16.2)."""
RESULTS = REPO / "bench" / "results"

_CHILD = r"""
import ctypes, gc, json, sys, tempfile, time
from pathlib import Path
from fedbits.resolve import load_config
from fedbits.runtime import open_run_dir
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.simulation import Simulation

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)

cfg = load_config(sys.argv[1], sys.argv[2:])
setup = prepare_run(cfg)
params = sum(p.numel() for p in setup.frozen.model.parameters())
loop = Simulation(setup, cfg.run_dir)
open_run_dir(cfg, False, True)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again here
rows = [loop.run_round(r) for r in (1, 2)]  # no evaluation: eval is excluded
peak = status("VmHWM")
r1 = rows[0]
n = len(r1["clients"])
model_mb = params * 4 / 2**20
print(json.dumps({
    "params": params,
    "fp32_model_mb": model_mb,
    "bytes_up_per_client": r1["bytes_up"] / n,
    "bytes_down_per_client": r1["bytes_down"] / n,
    "round_seconds": r1["train_seconds"],
    "seconds_per_client": r1["train_seconds"] / n,
    "rss_before_round_mb": before,
    "round_peak_rss_mb": peak,
    "round_peak_over_fp32_model": peak / model_mb,
    "clients": n,
    "rejected": r1["rejected"],
    "train_loss": r1["train_loss"],
}))
"""


def bench_one(method: str, model: str, out_dir: Path, extra: list[str]) -> dict:
    example = REPO / "examples" / ("tiny.toml" if model.startswith("tiny") else "quickstart.toml")
    raw = tomllib.loads(example.read_text())
    if raw["method"]["name"] != method:  # the example's method options belong to its method
        raw["method"] = {"name": method}
    base = out_dir / f"{method}-{model}.toml"
    base.write_text(dumps_toml(raw))
    overrides = [
        f"run.out_dir={out_dir}", f"run.name={method}-{model}", "run.rounds=2",
        f"model.name={model}", "eval.metrics=['loss']",
        "eval.max_examples=8", "clients.per_round=2", "clients.local_steps=2", *extra,
    ]
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), *overrides],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"method": method, "model": model, "error": proc.stderr[-2000:]}
    return {"method": method, "model": model, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(TARGETS) + ["partial", "fedcybgd"])
    p.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides, e.g. clients.gradient_checkpointing=true")
    p.add_argument("--out", type=Path, default=RESULTS / "round_cost.json")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for method in args.methods:
                res = bench_one(method, model, Path(tmp), args.set)
                if model == "smollm2-135m" and method in TARGETS and "error" not in res:
                    res["target"] = TARGETS[method]
                    res["meets_target"] = res["round_peak_over_fp32_model"] <= TARGETS[method]
                print(json.dumps(res))
                results.append(res)
    out = args.out
    out.write_text(json.dumps({
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "settings": "2 rounds (peak over both, bytes and seconds of round 1), 2 clients, "
                    "2 local steps, no evaluation; tiny: examples/tiny.toml, smollm2-135m: "
                    "examples/quickstart.toml (batch 8, max_length 128)",
        "overrides": args.set,
        "results": results,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
