"""Every method on a GPU: seconds per round, peak GPU memory, bytes; FedKSeed's kernels.

One prepared script for a lent GPU machine (run it once, keep time to run it again):

* every method for a few rounds on ``smollm2-135m`` and on ``random:llama-1b``, each
  (method, model) in its own process: seconds per round, peak GPU memory
  (``torch.cuda.max_memory_allocated``), bytes per client per round;
* the zeroth-order step ÷ a forward on the same batch (target <= 2.3);
* a 1,000-seed replay on the device, timed, and compared bit for bit with the same
  replay on the CPU.

``--device cpu`` is a dry run of the whole script on small settings (it checks the
script, not the figures). Writes ``bench/results/gpu.json`` on CUDA, else ``--out``.

    python bench/gpu.py                              # on the GPU machine
    python bench/gpu.py --device cpu --quick         # dry run anywhere
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
import tomllib
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
METHODS = ["fedavg", "fedit", "flasc", "partial", "fedcybgd", "fedkseed", "fedkseed-pro"]
MODELS = ["smollm2-135m", "random:llama-1b"]
QUICK_SIZE = ["model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
              "model.num_heads=4", "model.num_kv_heads=2", "model.vocab_size=1024"]

_CHILD = r"""
import json, sys, time
import torch
from fedbits.resolve import load_config
from fedbits.runtime import open_run_dir
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.simulation import Simulation
cfg = load_config(sys.argv[1], sys.argv[2:])
setup = prepare_run(cfg)
cuda = setup.frozen.device.type == "cuda"
loop = Simulation(setup, cfg.run_dir)
open_run_dir(cfg, False, True)
if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
rows = []
for r in range(1, cfg.run.rounds + 1):
    rows.append(loop.run_round(r))
    if cuda:
        torch.cuda.synchronize()
eval_start = time.perf_counter()
metrics = loop.evaluate()
n = max(len(rows[0]["clients"]), 1)
print(json.dumps({
    "seconds_per_round": [row["train_seconds"] for row in rows],
    "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    "bytes_up_per_client": rows[0]["bytes_up"] / n,
    "bytes_down_per_client": rows[0]["bytes_down"] / n,
    "rejected": [row["rejected"] for row in rows],
    "train_loss": [row["train_loss"] for row in rows],
    "eval_loss": metrics.get("eval_loss"),
    "eval_seconds": time.perf_counter() - eval_start,
}))
"""


def method_config(method: str) -> dict[str, Any]:
    """The method's example config (``examples/<method>.toml``: its options and the
    client settings that suit it, e.g. FedKSeed's small lr), else the quickstart's with
    the method's defaults: what a user starts from."""
    family = "fedkseed" if method.startswith("fedkseed") else method
    example = REPO / "examples" / f"{family}.toml"
    if not example.is_file():
        example = REPO / "examples" / "quickstart.toml"
    raw = tomllib.loads(example.read_text())
    if raw["method"].get("name") != family:
        raw["method"] = {"name": family}
    raw["method"]["name"] = method
    return raw


def run_method(method: str, model: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from fedbits.config import dumps_toml

    base = tmp / f"{method}.toml"
    base.write_text(dumps_toml(method_config(method)))
    overrides = [
        f"run.out_dir={tmp}", f"run.name={method}-{model.replace(':', '-')}",
        f"run.rounds={args.rounds}", f"model.name={model}", f"model.device={args.device}",
        f"model.dtype={args.dtype}", "eval.metrics=['loss']", "eval.max_examples=16",
        f"clients.per_round={args.clients}", f"clients.local_steps={args.local_steps}",
    ]
    if args.quick:
        overrides += ["data.builtin_per_task=10", "clients.max_length=64"]
        if model.startswith("random:"):
            overrides += QUICK_SIZE
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=args.timeout)
    out: dict[str, Any] = {"method": method, "model": model,
                           "wall_seconds": time.perf_counter() - start}
    if proc.returncode != 0:
        return {**out, "error": proc.stderr[-3000:]}
    return {**out, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def zo_ratio(args: argparse.Namespace) -> dict[str, Any]:
    """Median ZO step ÷ median forward (logits at labelled positions only, as the step
    computes them) on one batch, interleaved so drift hits both alike."""
    sys.path.insert(0, str(REPO / "bench"))
    from zo_step import packed_batch

    from fedbits.config import ModelSection
    from fedbits.frozen import resolve_device
    from fedbits.models import load_model
    from fedbits.train import label_logits
    from fedbits.zo.step import ZeroOrderTrainer

    device = resolve_device(args.device)
    model_name = "tiny-llama" if args.quick else "smollm2-135m"
    model, tok = load_model(ModelSection(name=model_name), seed=0)
    model.to(device).eval()  # type: ignore[arg-type]
    batch = {k: v.to(device) for k, v in packed_batch(tok).items()}
    trainer = ZeroOrderTrainer(model, eps=1e-3, lr=1e-7)
    forwards, steps = [], []
    with torch.no_grad(), trainer.attached():
        for i in range(args.repeats + 1):
            f = _timed(lambda: label_logits(model, batch), device)
            s = _timed(lambda i=i: trainer.step(i, batch), device)
            if i:  # the first of each warms up
                forwards.append(f)
                steps.append(s)
    fwd, step = statistics.median(forwards), statistics.median(steps)
    return {"model": model_name, "batch": "1 x 128 tokens", "forward_ms": fwd * 1e3,
            "zo_step_ms": step * 1e3, "ratio": step / fwd, "target": 2.3,
            "meets_target": step / fwd <= 2.3}


def replay_check(args: argparse.Namespace) -> dict[str, Any]:
    """A ``seeds``-seed replay on the device, timed, and bit for bit against the CPU's."""
    import numpy as np

    from fedbits.config import ModelSection
    from fedbits.frozen import resolve_device
    from fedbits.models import load_model
    from fedbits.zo.replay import Replay, SeedKeys, to_fixed

    device = resolve_device(args.device)
    model_name = "tiny-llama" if args.quick else "smollm2-135m"
    seeds = 50 if args.quick else 1000
    pool = np.zeros(4096)
    pool[np.random.default_rng(0).choice(4096, seeds, replace=False)] = np.random.default_rng(
        1).normal(0, 20, seeds)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    for where in dict.fromkeys([device, torch.device("cpu")]):
        model, _ = load_model(ModelSection(name=model_name), seed=0)
        model.to(where)  # type: ignore[arg-type]
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        replay = Replay(model, SeedKeys(list(range(4096))), "gaussian")
        seconds[where.type] = _timed(lambda r=replay, m=model, b=base: (
            r.move_to(to_fixed(pool)), r.write(m, b, 3e-7)), where)
        weights[where.type] = {n: p.detach().cpu() for n, p in model.named_parameters()}
        del model, base, replay
    identical = all(torch.equal(weights[device.type][n], weights["cpu"][n])
                    for n in weights["cpu"])
    return {"model": model_name, "seeds": seeds,
            **{f"{k}_seconds": v for k, v in seconds.items()},
            "compared_with_cpu": device.type != "cpu", "bit_identical_to_cpu": identical}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--timeout", type=int, default=900, help="seconds per (method, model)")
    p.add_argument("--quick", action="store_true", help="tiny settings: check the script")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or (RESULTS / "gpu.json" if args.device.startswith("cuda")
                       else Path(tempfile.gettempdir()) / "gpu-dryrun.json")
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "cpu_count": os.cpu_count()},
        "load_average_start": os.getloadavg(),
        "settings": vars(args) | {"out": str(out)},
        "methods": [],
    }

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    result["zo_step"] = zo_ratio(args)
    save()
    result["replay"] = replay_check(args)
    save()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for method in args.methods:
                row = run_method(method, model, args, Path(tmp))
                print(json.dumps(row), flush=True)
                result["methods"].append(row)
                save()
    result["load_average_end"] = os.getloadavg()
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
