"""FedKSeed bytes per client per round at K = 4096, τ = 200, from the ledger.

Runs the same FedKSeed experiment twice (same seed, same data, same clients), once
with the paper's reference layout (4-byte index + 4-byte float32 scalar, dense pool
16,384 B) and once with fedbits' compact default (12-bit indices, float16 scalars,
zstd when smaller), and reads every message's size from ``ledger.jsonl``. The byte
counts depend on K, τ and how many clients return, not on the model, so the model is
``tiny-llama`` by default (``--model smollm2-135m`` for the real one; τ = 200 ZO steps
per client then takes minutes per client on a CPU). Held-out eval loss of both runs is
reported to show the compact layout loses nothing measurable.

Writes ``bench/results/fedkseed_bytes.json``.

    python bench/fedkseed_bytes.py [--rounds 10] [--model tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from fedbits.resolve import load_config
from fedbits.runtime import run_experiment

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def per_client_round(run_dir: Path) -> list[dict]:
    totals: dict[tuple[int, int], dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        row = json.loads(line)
        totals[(row["round"], row["client"])][row["direction"]] += row["bytes"]
    return [
        {"round": r, "client": c, **v, "total": v["up"] + v["down"]}
        for (r, c), v in sorted(totals.items())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    out: dict = {"model": args.model, "num_seeds": 4096, "local_steps": 200, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        for wire in ("reference", "compact"):
            cfg = load_config(REPO / "examples" / "fedkseed-tiny.toml", [
                f"run.out_dir={tmp}", f"run.name={wire}", f"run.rounds={args.rounds}",
                f"model.name={args.model}", "method.num_seeds=4096", "clients.local_steps=200",
                "data.num_clients=10", "clients.per_round=3", "data.builtin_per_task=40",
                "eval.max_examples=64", f"method.wire={wire}",
                "clients.lr=1e-4",  # the tiny example's 1e-3 diverges over τ = 200 steps
            ])
            run_dir = run_experiment(cfg)
            msgs = per_client_round(run_dir)
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            out[wire] = {
                "mean_bytes_per_client_round": sum(m["total"] for m in msgs) / len(msgs),
                "max_bytes_per_client_round": max(m["total"] for m in msgs),
                "mean_up": sum(m["up"] for m in msgs) / len(msgs),
                "mean_down": sum(m["down"] for m in msgs) / len(msgs),
                "max_up": max(m["up"] for m in msgs),
                "max_down": max(m["down"] for m in msgs),
                "last_round_mean": sum(m["total"] for m in msgs if m["round"] == args.rounds)
                / sum(1 for m in msgs if m["round"] == args.rounds),
                "eval_loss_round0": rows[0]["eval_loss"],
                "eval_loss_final": rows[-1]["eval_loss"],
                "eval_loss_by_round": [r["eval_loss"] for r in rows],
                "rejected": sum(len(r["rejected"]) for r in rows),
                "messages": msgs,
            }
    out["targets"] = {"reference": 17984, "compact": 9000}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fedkseed_bytes.json").write_text(json.dumps(out, indent=2) + "\n")
    shown = {
        k: ({kk: vv for kk, vv in v.items() if kk != "messages"} if isinstance(v, dict) else v)
        for k, v in out.items()
    }
    print(json.dumps(shown, indent=2))


if __name__ == "__main__":
    main()
