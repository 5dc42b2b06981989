"""Cost at scale: bytes, peak memory and step time per method, from 135M to 1.1B parameters.

For every (model, method) pair, one federated round with one client, each in its own
process so peak RSS is that pair's own. The larger models are random architectures of
real shapes (``random:llama-360m``, ``random:llama-1b``: docs/models-random.md), so
nothing is downloaded; bytes on the wire, memory and compute depend only on the shape.

Measured per pair: bytes per client per round (up and down, from ``metrics.jsonl``),
peak RSS of the simulation process (server and client halves and the evaluation
together), and seconds per local step (the training loop's time, first step included,
divided by ``clients.local_steps``). FedAvg is skipped where its estimate (about 12x
the float32 parameters, :data:`FEDAVG_BYTES_PER_PARAM`) exceeds 80% of this machine's
memory. Writes ``bench/results/scale.json`` (after every pair, so an interrupted bench
keeps what it measured) and ``scale.png`` next to it.

    python bench/scale.py                                  # everything: ~30-40 min, 2 cores
    python bench/scale.py --models random:llama --methods fedit \\
        --set model.hidden_size=64 --set model.num_layers=2 --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from fedbits.config import ModelSection, dumps_toml
from fedbits.models import RANDOM_PRESETS, SIZE_KEYS, SMOLLM2_PARAMS, random_shape

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
METHODS = ["fedavg", "fedit", "flasc", "partial", "fedcybgd", "fedkseed", "fedkseed-pro"]
MODELS = ["smollm2-135m", "random:llama-360m", "random:llama-1b"]
FEDAVG_BYTES_PER_PARAM = 12 * 4
"""FedAvg's memory estimate: about twelve float32 copies of the model in one process, as
``bench/round_cost.py`` measures on smollm2-135m (server and client weights, gradient,
AdamW's two moments, start values, the sealed downlink and its opened body, another
client's decoded update, encoding temporaries)."""
MEMORY_FRACTION = 0.8

SETTINGS = [
    "run.rounds=1", "data.builtin_per_task=4", "data.num_clients=2", "data.partition=iid",
    "clients.per_round=1", "clients.batch_size=1", "clients.max_length=128",
    "eval.metrics=['loss']", "eval.max_examples=2", "eval.batch_size=2",
]
"""Overrides of every pair: one small round, so the 1B model fits the time budget."""

_CHILD = r"""
import json, sys, time
import fedbits.methods._updates as updates
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.loop import peak_rss_mb

# every gradient method trains through _updates.local_train: time just that loop
train_seconds = []
_local_train = updates.local_train
def timed_local_train(*args, **kwargs):
    start = time.perf_counter()
    try:
        return _local_train(*args, **kwargs)
    finally:
        train_seconds.append(time.perf_counter() - start)
updates.local_train = timed_local_train

cfg = load_config(sys.argv[1], sys.argv[2:])
start = time.perf_counter()
run_dir = run_experiment(cfg)
wall = time.perf_counter() - start
rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
r1 = rows[1]
n = len(r1["clients"])
if not train_seconds:  # zeroth-order methods time their own steps
    train_seconds = [s["train_seconds"] for s in r1["client_stats"].values()
                     if "train_seconds" in s]
steps = cfg.clients.local_steps
print(json.dumps({
    "bytes_up_per_client": r1["bytes_up"] / n,
    "bytes_down_per_client": r1["bytes_down"] / n,
    "seconds_per_step": sum(train_seconds) / (len(train_seconds) * steps)
                        if train_seconds else None,
    "round_seconds": r1["train_seconds"],
    "run_seconds": wall,
    "peak_rss_mb": peak_rss_mb(),
    "clients": n,
    "rejected": r1["rejected"],
    "train_loss": r1["train_loss"],
    "eval_loss": r1.get("eval_loss"),
}))
"""


def mem_total_bytes() -> int:
    """This machine's memory, from /proc/meminfo (Linux; 0 when unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def size_overrides(sets: list[str]) -> dict[str, int]:
    """The ``model.<size key>=N`` among the --set overrides, for the parameter count."""
    out = {}
    for item in sets:
        key, _, value = item.partition("=")
        if key.startswith("model.") and key[6:] in SIZE_KEYS:
            out[key[6:]] = int(value)
    return out


def parameter_count(model: str, sets: list[str]) -> int | None:
    """Parameters of ``model`` without building it: random architectures from their
    shape, the builtin SmolLM2 from its known count; None for anything else."""
    if model in RANDOM_PRESETS:
        return random_shape(ModelSection(name=model, **size_overrides(sets))).parameters
    if model == "smollm2-135m":
        return SMOLLM2_PARAMS
    return None


def method_table(method: str) -> dict[str, Any]:
    """The ``[method]`` table of the method's example (``examples/<method>.toml``, or
    the quickstart's for FedIT), so each method runs with the options it is shown with;
    its defaults where it has no example."""
    for name in (f"{method}.toml", "quickstart.toml"):
        path = REPO / "examples" / name
        if path.is_file():
            table = tomllib.loads(path.read_text()).get("method", {})
            if table.get("name") == method:
                return dict(table)
    return {"name": method}


def fedavg_skip_reason(params: int | None, mem_total: int) -> str | None:
    if params is None or not mem_total:
        return None
    need = FEDAVG_BYTES_PER_PARAM * params
    if need <= MEMORY_FRACTION * mem_total:
        return None
    return (f"estimated {need / 2**30:.1f} GiB ({FEDAVG_BYTES_PER_PARAM // 4} x float32 "
            f"parameters) exceeds {MEMORY_FRACTION:.0%} of this machine's "
            f"{mem_total / 2**30:.1f} GiB")


def bench_one(method: str, model: str, local_steps: int, sets: list[str], out_dir: Path,
              timeout: float, threads: int | None = None) -> dict[str, Any]:
    raw = tomllib.loads((REPO / "examples" / "quickstart.toml").read_text())
    raw["method"] = method_table(method)
    tag = f"{method}-{model.replace(':', '-')}"
    base = out_dir / f"{tag}.toml"
    base.write_text(dumps_toml(raw))
    overrides = [f"run.out_dir={out_dir}", f"run.name={tag}", f"model.name={model}",
                 f"clients.local_steps={local_steps}", *SETTINGS, *sets]
    row: dict[str, Any] = {"method": method, "model": model,
                           "parameters": parameter_count(model, sets),
                           "method_options": raw["method"]}
    env = dict(os.environ)
    if threads is not None:  # read by torch's OpenMP pool when the child starts
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), *overrides],
                              capture_output=True, text=True, cwd=REPO, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode < 0:  # the kernel's OOM killer leaves no message
        return {**row, "error": f"killed by signal {-proc.returncode} (out of memory?)"}
    if proc.returncode != 0:
        return {**row, "error": proc.stderr[-2000:]}
    return {**row, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Cost against parameters, log-log, one line per method: bytes per client per round
    (up + down), peak RSS, seconds per local step."""
    panels = [
        ("bytes per client per round (up + down)",
         lambda r: r["bytes_up_per_client"] + r["bytes_down_per_client"]),
        ("peak RSS (MB)", lambda r: r["peak_rss_mb"]),
        ("seconds per local step", lambda r: r["seconds_per_step"]),
    ]
    fig = Figure(figsize=(15, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    methods = list(dict.fromkeys(r["method"] for r in results))
    sizes = sorted({r["parameters"] for r in results if r.get("parameters")})
    for ax, (title, value) in zip(axes, panels, strict=True):
        for method in methods:
            points = sorted(
                (r["parameters"], value(r)) for r in results
                if r["method"] == method and "error" not in r and "skipped" not in r
                and r.get("parameters") and (value(r) or 0) > 0
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # one labelled tick per model measured: the range is about one decade, where
        # matplotlib's own minor labels overlap
        ax.set_xticks(sizes, [_short(n) for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("parameters")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("fedbits: cost of one client round against model size")
    missing = [f"{r['method']} at {r['model']}: "
               f"{'skipped (memory)' if 'skipped' in r else 'failed'}"
               for r in results if "skipped" in r or "error" in r]
    if missing:  # a line that simply stops must not read as a measurement
        fig.text(0.01, 0.01, "not measured: " + "; ".join(missing), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="an override for every run, e.g. model.dtype=bfloat16 or a size key")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per (method, model)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: torch's own, one per core); on a "
                   "machine shared with other jobs idle threads spin, so 1 is steadier")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json",
                   help="the JSON file; the plot is written next to it as .png")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mem_total = mem_total_bytes()
    report: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "torch_threads": args.threads or torch.get_num_threads(),
                    "mem_total_bytes": mem_total,
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "load_average_start": os.getloadavg(),
        "settings": {"local_steps": args.local_steps, "overrides": SETTINGS + args.set,
                     "base": "examples/quickstart.toml with the method's example [method] "
                             "table (examples/<method>.toml) where there is one",
                     "note": "one process per (method, model); peak RSS covers the server, "
                             "the client and the evaluation of that process"},
        "results": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedbits-scale-") as tmp:
        for model in args.models:
            for method in args.methods:
                params = parameter_count(model, args.set)
                reason = fedavg_skip_reason(params, mem_total) if method == "fedavg" else None
                if reason is not None:
                    res: dict[str, Any] = {"method": method, "model": model,
                                           "parameters": params, "skipped": reason}
                else:
                    res = bench_one(method, model, args.local_steps, args.set, Path(tmp),
                                    args.timeout, args.threads)
                print(json.dumps({k: v for k, v in res.items() if k != "method_options"}),
                      flush=True)
                report["results"].append(res)
                report["load_average_end"] = os.getloadavg()
                report["seconds"] = time.perf_counter() - started
                args.out.write_text(json.dumps(report, indent=2))
    png = args.out.with_suffix(".png")
    plot(report["results"], png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
