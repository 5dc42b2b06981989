"""Peak memory of a FedKSeed client against plain inference, one fresh process each.

Every process loads the same model (``smollm2-135m`` from its converted
``save_pretrained`` directory, :func:`fedbits.paths.converted_model_dir`) and uses the
same batch (1 × 128 tokens); each reports its peak RSS:

* ``inference``: forwards only;
* ``zo_training``: zeroth-order steps (:class:`ZeroOrderTrainer`) on the loaded model,
  no replay: no gradient, no optimizer state, no full-size direction; its extra memory
  is the doubled activations of the ± batch and one layer's θ ± εz;
* ``client_full`` / ``client_incremental`` (``whole_client_round``): a client process
  as the runtime makes it. The loaded model becomes the frozen base
  (:class:`fedbits.frozen.FrozenBase` over the checkpoint directory); a real
  :class:`FedKSeedClient` builds its float32 working copy from it; the base is released
  (the process then holds only the working model, and w0 is read back from the
  checkpoint on disk one tensor at a time); the client syncs to a pool of
  ``--sync-seeds`` nonzero seeds by its own replay path (``full``: chunk by chunk, no
  accumulator; ``incremental``: the int64 accumulator, kept through training); then the
  same steps.

Each process reports the peak RSS of each phase (VmHWM, reset between phases through
``/proc/self/clear_refs``, where the kernel allows it): what loading, building, replay
and training each reach on their own. The whole-process peak is the largest of them
(a reset lowers ``ru_maxrss`` too; without resets it is ``ru_maxrss``). Note that
``from_pretrained`` maps the safetensors file: the weights become resident when first
touched (the first forward, or the build's copy), not at load.
The load average is recorded before and after: the machine may be shared.

Writes ``bench/results/zo_memory.json``.

    python bench/zo_memory.py [--model smollm2-135m] [--steps 5] [--sync-seeds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("inference", "zo_training", "client_full", "client_incremental")
NUM_SEEDS = 4096
LR = 3e-7


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MB, None where absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Phases:
    """The peak RSS of each phase of a process: VmHWM, reset at the start of each phase."""

    def __init__(self) -> None:
        self.peaks: dict[str, float | None] = {}
        self.name: str | None = None

    def start(self, name: str) -> None:
        self.end()
        self.name = name
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
        except OSError:
            self.name = None  # not allowed here: only the whole-process peak is reported

    def end(self) -> None:
        if self.name is not None:
            self.peaks[self.name] = _status_mb("VmHWM")
        self.name = None


def _checkpoint(model: str) -> tuple[str, Path | None]:
    """The name to load and the save_pretrained directory the base is read back from."""
    from fedbits.paths import converted_model_dir

    if model == "smollm2-135m":
        target = converted_model_dir(model)
        if not target.is_dir():  # converted on the first load of the builtin name
            from fedbits.config import ModelSection
            from fedbits.models import load_model

            load_model(ModelSection(name=model), seed=0)
        return str(target), target
    path = Path(model)
    return model, path if path.is_dir() else None


def child(mode: str, model_name: str, steps: int, sync_seeds: int) -> dict[str, Any]:
    """One measured process (run as ``--child MODE``)."""
    phases = Phases()
    phases.start("load")
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from zo_step import packed_batch

    from fedbits.config import ClientsSection, ModelSection
    from fedbits.frozen import FrozenBase
    from fedbits.methods.base import MethodContext
    from fedbits.methods.fedkseed.client import FedKSeedClient
    from fedbits.methods.fedkseed.options import FedKSeedOptions
    from fedbits.models import load_model
    from fedbits.zo.step import ZeroOrderTrainer

    name, checkpoint = _checkpoint(model_name)
    model, tok = load_model(ModelSection(name=name), seed=0)
    model.eval()
    batch = packed_batch(tok)
    result: dict[str, Any] = {}
    if mode == "inference":
        phases.start("forward")
        with torch.no_grad():
            for _ in range(steps):
                model(**batch)
    elif mode == "zo_training":
        phases.start("train")
        trainer = ZeroOrderTrainer(model, eps=5e-4, lr=LR)
        with trainer.attached():
            for i in range(steps):
                trainer.step(i, batch)
    else:
        phases.start("build")
        frozen = FrozenBase(model, checkpoint)
        del model
        ctx = MethodContext(
            method="fedkseed",
            options=FedKSeedOptions(num_seeds=NUM_SEEDS, eps=5e-4,
                                    client_replay=mode.removeprefix("client_")),
            seed=0, clients=ClientsSection(lr=LR, local_steps=steps, batch_size=1),
            cohort=1, model_name=model_name, tokenizer=tok,
            build_model=partial(frozen.build, take=True),  # the process's only half
            base_tensor=frozen.tensor, device=frozen.device,
        )
        client = FedKSeedClient(ctx)
        result["base_released"] = frozen.release() or frozen.released  # taken, or now
        phases.start("replay")
        pool = np.zeros(NUM_SEEDS)
        pool[np.random.default_rng(0).choice(NUM_SEEDS, sync_seeds, replace=False)] = 50.0
        result["seeds_replayed"] = client.sync(pool)
        phases.start("train")
        with client.trainer.attached():
            for i in range(steps):
                client.trainer.step(client.keys.seeds[i], batch)
    phases.end()
    # each reset of the peak also lowers ru_maxrss: the process's peak is the largest
    # phase peak (the phases cover the process's whole life, one after the other)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_mb"] = max([maxrss, *(p for p in phases.peaks.values() if p is not None)])
    result["phase_peak_rss_mb"] = phases.peaks
    return result


def measure(mode: str, model: str, steps: int, sync_seeds: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--model", model, "--steps", str(steps),
           "--sync-seeds", str(sync_seeds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sync-seeds", type=int, default=200,
                        help="nonzero pool seeds the client replays first")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps, args.sync_seeds)))
        return

    load_before = os.getloadavg()
    _checkpoint(args.model)  # convert once here, so no measured process pays for it
    runs = {mode: measure(mode, args.model, args.steps, args.sync_seeds) for mode in MODES}
    inference = runs["inference"]["peak_rss_mb"]
    training = runs["zo_training"]["peak_rss_mb"]
    clients = {mode: runs[mode] for mode in ("client_full", "client_incremental")}
    result = {
        "model": args.model,
        "batch": "1 x 128 tokens",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "inference_peak_rss_mb": inference,
        "zo_training_peak_rss_mb": training,
        "ratio": training / inference,
        "target": "ratio <= 1.3",
        "whole_client_round": {
            "what": "FedKSeedClient over a frozen base released after the build (w0 read "
                    f"back from the checkpoint on disk), its replay of {args.sync_seeds} "
                    "nonzero pool seeds, then the same steps",
            **{f"{mode}_peak_rss_mb": r["peak_rss_mb"] for mode, r in clients.items()},
            **{f"{mode}_over_inference": r["peak_rss_mb"] / inference
               for mode, r in clients.items()},
            "target": "client_full_over_inference <= 1.5",
        },
        "phase_peak_rss_mb": {mode: r["phase_peak_rss_mb"] for mode, r in runs.items()},
        "base_released": {mode: r.get("base_released") for mode, r in clients.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zo_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
