"""One federated round per method and model: bytes per client, seconds, peak RSS.

Each (method, model) pair runs in its own process so peak RSS is its own. Writes
``bench/results/round_cost.json``. Not a test: numbers, not assertions.

    python bench/round_cost.py                      # all methods, tiny + smollm2-135m
    python bench/round_cost.py --models tiny-llama --methods fedit
"""

from __future__ import annotations

import argparse
import json
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

_CHILD = r"""
import json, sys, time
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.loop import peak_rss_mb
cfg = load_config(sys.argv[1], sys.argv[2:])
start = time.perf_counter()
run_dir = run_experiment(cfg)
rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
r1 = rows[1]
n = len(r1["clients"])
print(json.dumps({
    "bytes_up_per_client": r1["bytes_up"] / n,
    "bytes_down_per_client": r1["bytes_down"] / n,
    "round_seconds": r1["train_seconds"],
    "seconds_per_client": r1["train_seconds"] / n,
    "peak_rss_mb": peak_rss_mb(),
    "clients": n,
    "train_loss": r1["train_loss"],
}))
"""


def bench_one(method: str, model: str, out_dir: Path) -> dict:
    example = REPO / "examples" / ("tiny.toml" if model.startswith("tiny") else "quickstart.toml")
    raw = tomllib.loads(example.read_text())
    if raw["method"]["name"] != method:  # the example's method options belong to its method
        raw["method"] = {"name": method}
    base = out_dir / f"{method}-{model}.toml"
    base.write_text(dumps_toml(raw))
    overrides = [
        f"run.out_dir={out_dir}", f"run.name={method}-{model}", "run.rounds=1",
        f"model.name={model}", "eval.metrics=['loss']",
        "eval.max_examples=8", "clients.per_round=2", "clients.local_steps=2",
    ]
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), *overrides],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"method": method, "model": model, "error": proc.stderr[-2000:]}
    return {"method": method, "model": model, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["fedavg", "fedit"])
    p.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for method in args.methods:
                res = bench_one(method, model, Path(tmp))
                print(json.dumps(res))
                results.append(res)
    out = RESULTS / "round_cost.json"
    out.write_text(json.dumps({
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "settings": "1 round, 2 clients, 2 local steps; tiny: examples/tiny.toml, "
                    "smollm2-135m: examples/quickstart.toml",
        "results": results,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
