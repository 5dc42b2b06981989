"""Does error feedback help top-k at density 1/64? Same seed, with and without.

Three runs of ``examples/tiny.toml`` with ``fedavg`` (full-parameter, so top-k
drops most of every update): dense uplink, ``["topk:1/64"]`` without error
feedback, and the same with ``method.error_feedback = true``. Reported per run: the
held-out eval loss every round, and the cosine between the run's total change of
the weights (final − initial) and the dense run's — how much of the uncompressed
direction survives compression.

Writes ``bench/results/error_feedback.json``.

    python bench/error_feedback.py [--rounds 10] [--density 1/64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedbits.logs import configure
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.setup import prepare_run

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def flat_weights(run_dir: Path) -> torch.Tensor:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "final").glob("*.safetensors")):
        tensors.update(load_file(f))
    return torch.cat([tensors[k].float().flatten() for k in sorted(tensors)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--density", default="1/64")
    args = parser.parse_args()
    configure()  # each run's progress lines, as `fedbits run` shows them
    runs = {
        "dense": [],
        "topk": [f"method.uplink=['topk:{args.density}']"],
        "topk + error feedback": [
            f"method.uplink=['topk:{args.density}']", "method.error_feedback=true"
        ],
    }
    out: dict = {"model": "tiny-llama", "method": "fedavg", "rounds": args.rounds,
                 "density": args.density, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name, extra in runs.items():
            cfg = load_config(REPO / "examples" / "tiny.toml", [
                f"run.out_dir={tmp}", f"run.name={name.replace(' ', '_').replace('+', 'and')}",
                f"run.rounds={args.rounds}", "method.name=fedavg", "eval.metrics=['loss']", *extra,
            ])
            dirs[name] = run_experiment(cfg)
            rows = [json.loads(x) for x in (dirs[name] / "metrics.jsonl").read_text().splitlines()]
            out["runs"][name] = {"eval_loss": [r["eval_loss"] for r in rows],
                                 "bytes_up": sum(r["bytes_up"] for r in rows)}
        setup = prepare_run(cfg)
        base = {n: p for n, p in setup.build_model().state_dict().items()}
        start = torch.cat([base[k].float().flatten() for k in sorted(base)])
        dense_change = flat_weights(dirs["dense"]) - start
        for name, run_dir in dirs.items():
            change = flat_weights(run_dir) - start
            out["runs"][name]["cosine_to_dense_change"] = torch.nn.functional.cosine_similarity(
                change, dense_change, dim=0).item()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "error_feedback.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
