"""What client-level DP (``[privacy]``, docs/privacy.md) costs a run: ε per round and the
held-out loss, next to the run without ``[privacy]``.

On the tiny model (``examples/tiny.toml``), ``--clients`` iid clients of which
``--per-round`` train each round (q = per-round / clients), for ``--rounds`` rounds of
``--method``: the plain run, then one run per ``--noise`` multiplier with every update
clipped to ``--clip`` (noise 0: clipping and the fixed denominator alone). Records each
run's ε after every round, its final held-out loss and train loss, and how many updates
were clipped.

Writes ``bench/results/privacy.json`` (``--out`` elsewhere), with the load average
before and after, since the runs share the machine.

    python bench/privacy.py [--method fedit] [--rounds 5] [--clients 20] [--per-round 10]
                            [--clip 0.5] [--noise 0 0.5 1.0] [--set KEY=VALUE ...]
                            [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedbits.logs import configure
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment

logger = logging.getLogger("fedbits.bench.privacy")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TINY = REPO / "examples" / "tiny.toml"


def one_run(out_dir: str, name: str, overrides: list[str]) -> dict[str, Any]:
    """Run the tiny model with ``overrides``; what its metrics say about privacy and loss."""
    cfg = load_config(TINY, [f"run.out_dir={out_dir}", f"run.name={name}", *overrides])
    start = time.perf_counter()
    run_dir = run_experiment(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "name": name,
        "overrides": overrides,
        "seconds": round(time.perf_counter() - start, 1),
        "dp_epsilon": [row.get("dp_epsilon") for row in rows[1:]],
        "dp_delta": rows[-1].get("dp_delta"),
        "eval_loss": [row.get("eval_loss") for row in rows],
        "final_eval_loss": rows[-1]["eval_loss"],
        "final_train_loss": rows[-1]["train_loss"],
        "clipped": sum(row.get("server_stats", {}).get("dp_clipped", 0) for row in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="fedit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = parser.parse_args()
    configure(logging.WARNING)  # the runs' warnings; the table is logged below
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    common = [f"method.name={args.method}", f"run.rounds={args.rounds}",
              f"data.num_clients={args.clients}", "data.partition=iid",
              f"clients.per_round={args.per_round}", "eval.metrics=['loss']", *args.extra]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as out_dir:
        runs = [one_run(out_dir, "plain", common)]
        for noise in args.noise:
            runs.append(one_run(out_dir, f"clip{args.clip:g}-z{noise:g}", [
                *common, f"privacy.clip_norm={args.clip}", f"privacy.noise_multiplier={noise}",
                "privacy.noise_seed=run"]))  # reproducible figures (the default key is secret)
    result = {
        "bench": "privacy", "method": args.method, "rounds": args.rounds,
        "clients": args.clients, "per_round": args.per_round, "clip_norm": args.clip,
        "runs": runs, "threads": args.threads, "machine": platform.machine(),
        "torch": torch.__version__,
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plain = runs[0]["final_eval_loss"]
    for run in runs:
        eps = ", ".join("-" if e is None else f"{e:.2f}" for e in run["dp_epsilon"])
        logger.info("%-16s eval loss %.4f (%+.1f %%)  ε per round: %s  clipped %d",
                       run["name"], run["final_eval_loss"],
                       100 * (run["final_eval_loss"] / plain - 1), eps, run["clipped"])
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
