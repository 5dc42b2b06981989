"""Seed replay: fedbits' exact fused replay against the reference loop, one process.

Replays N seeds (default 1,000) into ``smollm2-135m``:

* ``fedbits``: :class:`fedbits.zo.replay.Replay` — one pass over the weights for all
  seeds (each block of the accumulator stays in cache while the seeds stream past),
  directions from fedbits' keyed generator, exact integer accumulation;
* ``one_at_a_time``: the same seeds replayed one call per seed with fedbits' own
  generator (integer accumulation, so the result must be identical), and the float
  loop ``w -= lr·c·z`` seed by seed, whose rounding differs slightly (both reported);
* ``reference``: the reference implementation's approach: per seed, ``torch.manual_seed``
  then ``torch.normal`` per tensor, ``w -= lr·c·z``. It is slow, so it runs on
  ``--reference-seeds`` seeds (default 20) and is scaled linearly to N (each seed is
  the same work; stated in the output).

Writes ``bench/results/replay.json``.

    python bench/replay.py [--seeds 1000] [--reference-seeds 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedbits.config import ModelSection
from fedbits.models import load_model
from fedbits.zo import kernels
from fedbits.zo.generator import TABLE_SCALE, direction
from fedbits.zo.replay import FIXED_BITS, Replay, SeedKeys, to_fixed

RESULTS = Path(__file__).resolve().parent / "results"
LR = 3e-7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--reference-seeds", type=int, default=20)
    parser.add_argument("--check-seeds", type=int, default=5,
                        help="seeds for the one-at-a-time comparisons (each is a full pass)")
    args = parser.parse_args()

    model, _ = load_model(ModelSection(name=args.model), seed=0)
    params = dict(model.named_parameters())
    numel = sum(p.numel() for p in params.values())
    rng = np.random.default_rng(0)
    seeds = rng.integers(0, 2**62, args.seeds).tolist()
    pool = rng.normal(0, 50, args.seeds)  # scalars of the size FedKSeed accumulates
    keys = SeedKeys(seeds)
    for name in params:  # key derivation is a one-off per run; keep it out of the timing
        keys(name)

    replay = Replay(model, keys, "gaussian")
    start = time.perf_counter()
    replay.move_to(to_fixed(pool))
    fused = time.perf_counter() - start

    # the same seeds one call at a time (first check_seeds), integer: must be identical
    check = args.check_seeds
    partial = Replay(model, SeedKeys(seeds[:check]), "gaussian")
    partial.move_to(to_fixed(pool[:check]))
    single = {n: torch.zeros(p.numel(), dtype=torch.int64) for n, p in params.items()}
    fix = to_fixed(pool[:check])
    start = time.perf_counter()
    for i in range(check):
        one = fix[i : i + 1]
        ends = kernels.exact_groups(one, "gaussian")
        for name in params:
            kernels.replay_(partial.keys(name)[i : i + 1], one, ends, 0, single[name], "gaussian")
    one_call_per_seed = (time.perf_counter() - start) / check
    identical = all(torch.equal(single[n], partial.acc[n]) for n in params)

    # float sequential with fedbits' generator vs the exact replay, on the first check seeds
    max_abs = 0.0
    exact_scale = LR / float((1 << FIXED_BITS) * TABLE_SCALE)
    quantised = fix.astype(np.float64) / (1 << FIXED_BITS)
    for name, p in params.items():
        w = p.detach().clone().view(-1)
        for i in range(check):
            z = direction(partial.keys(name)[i].item(), 0, w.numel(), "gaussian")
            w -= torch.tensor(LR * quantised[i], dtype=torch.float32) * z
        exact = torch.empty_like(w)
        kernels.apply(p.detach().view(-1), partial.acc[name], exact_scale, exact)
        max_abs = max(max_abs, (w - exact).abs().max().item())

    # the reference approach
    ref_model = [p.detach().clone() for p in params.values()]
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(args.reference_seeds):
            torch.manual_seed(seeds[i])
            for w in ref_model:
                z = torch.normal(0, 1, size=w.shape, dtype=w.dtype)
                w.sub_(LR * float(pool[i]) * z)
    per_seed_reference = (time.perf_counter() - start) / args.reference_seeds

    reference_total = per_seed_reference * args.seeds
    result = {
        "model": args.model,
        "parameters": numel,
        "seeds": args.seeds,
        "threads": torch.get_num_threads(),
        "fedbits_fused_seconds": fused,
        "fedbits_ms_per_seed": 1000 * fused / args.seeds,
        "fedbits_one_call_per_seed_ms": 1000 * one_call_per_seed,
        "reference_ms_per_seed": 1000 * per_seed_reference,
        "reference_seconds_for_all_seeds": reference_total,
        "reference_measured_on_seeds": args.reference_seeds,
        "speedup_vs_reference": reference_total / fused,
        "one_at_a_time_integer_identical": identical,
        "one_at_a_time_float32_max_abs_diff": max_abs,
        "checked_on_seeds": check,
        "target": "speedup_vs_reference >= 10",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "replay.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
