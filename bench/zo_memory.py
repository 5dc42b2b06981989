"""Peak memory of a FedKSeed client's local training against plain inference.

Two fresh processes on the same model and the same batch (1 × 128 tokens): one runs
inference forwards, the other zeroth-order steps (:class:`ZeroOrderTrainer`); each
reports its peak RSS. The training process holds no gradient, no optimizer state and
no full-size direction: its extra memory is the doubled activations of the ± batch
and one layer's θ ± εz. (Replay state — base weights and the accumulator — is part
of syncing, not of local training; the ``whole_client_round`` rows measure a client
process over a whole round — base weights kept, exact replay, then training — in both
``client_replay`` modes.)

Writes ``bench/results/zo_memory.json``.

    python bench/zo_memory.py [--model smollm2-135m] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

_CHILD = r"""
import json, resource, sys
import torch
sys.path.insert(0, {bench!r})
from zo_step import packed_batch
from fedbits.config import ModelSection
from fedbits.models import load_model
from fedbits.zo.step import ZeroOrderTrainer
model, tok = load_model(ModelSection(name={model!r}), seed=0)
model.eval()
batch = packed_batch(tok)
if {mode!r} == "inference":
    with torch.no_grad():
        for _ in range({steps}):
            model(**batch)
else:
    if {mode!r}.startswith("client"):
        import numpy as np
        from fedbits.zo.replay import Replay, SeedKeys, to_fixed
        base = {{n: p.detach().clone() for n, p in model.named_parameters()}}
        pool = np.zeros(4096)
        pool[np.random.default_rng(0).choice(4096, {sync_seeds}, replace=False)] = 50.0
        replay = Replay(model, SeedKeys(range(4096)), "gaussian")
        replay.move_to(to_fixed(pool))
        replay.write(model, base, 3e-7)
        if {mode!r} == "client_full":
            del replay  # full mode keeps no accumulator between rounds
    trainer = ZeroOrderTrainer(model, eps=5e-4, lr=3e-7)
    with trainer.attached():
        for i in range({steps}):
            trainer.step(i, batch)
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(mode: str, model: str, steps: int, sync_seeds: int = 0) -> float:
    code = _CHILD.format(bench=str(Path(__file__).resolve().parent), model=model, mode=mode,
                         steps=steps, sync_seeds=sync_seeds)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sync-seeds", type=int, default=200,
                        help="pool seeds the client replays first")
    args = parser.parse_args()
    inference = measure("inference", args.model, args.steps)
    training = measure("zo_training", args.model, args.steps)
    clients = {mode: measure(mode, args.model, args.steps, args.sync_seeds)
               for mode in ("client_full", "client_incremental")}
    result = {
        "model": args.model,
        "batch": "1 x 128 tokens",
        "inference_peak_rss_mb": inference,
        "zo_training_peak_rss_mb": training,
        "ratio": training / inference,
        "target": "ratio <= 1.3",
        "whole_client_round": {
            "what": f"base weights kept, exact replay of {args.sync_seeds} pool seeds, "
                    "then the same steps",
            **{f"{mode}_peak_rss_mb": mb for mode, mb in clients.items()},
            **{f"{mode}_over_inference": mb / inference for mode, mb in clients.items()},
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zo_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
