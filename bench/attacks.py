"""The attack table: what each malicious-client attack does to each method's final loss.

On the tiny model (``examples/tiny.toml``; FedKSeed with ``examples/fedkseed-tiny.toml``'s
client and seed-pool settings), 3 clients of which all 3 train every round and one, the
same one, is malicious (``faults.malicious_fraction = 1/3``: a fixed set, so it attacks
in every round), for ``--rounds`` rounds. For every method and every attack in
``fedbits.config.ATTACKS``: the final held-out loss with the run's default defences and
with the defences turned off (:data:`DEFENCES_OFF`), next to the clean run's (no
``[faults]``) and the run without the attacker's updates (:data:`ATTACKER_DROPPED`), and
how many attacked updates were rejected.

The defence settings are the ``[robust]`` section's; until a fedbits without them
knows the keys, the "defences off" runs are skipped with a message and the table has
the defaults only.

Writes ``bench/results/attacks.json`` (``--out`` elsewhere), with the load average
before and after, since the runs share the machine, and the table as Markdown next to it
(``attacks.md``).

    python bench/attacks.py [--rounds 10] [--methods fedavg fedit flasc fedkseed]
                            [--attacks scale nan ...] [--set KEY=VALUE ...] [--threads 1]
                            [--quick] [--out PATH]

On a random tiny model the held-out loss sits near ln(vocabulary) whatever happens,
and an RMSNorm before the output head absorbs much of a scaled change, so the loss
column moves little; the rejected counts are the robust signal there. ``--set
model.name=smollm2-135m`` (and more rounds) shows the damage on a real model.
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

from fedbits.config import ATTACKS
from fedbits.errors import ConfigError, FedbitsError
from fedbits.logs import configure
from fedbits.report import load_run
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment

logger = logging.getLogger("fedbits.bench.attacks")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TINY = REPO / "examples" / "tiny.toml"

DEFENCES_OFF = ["robust.aggregator=mean", "robust.norm_bound=off", "robust.scalar_bound=off",
                "robust.max_weight=4294967295"]
"""``--set`` overrides that turn the server's defences off (the ``[robust]`` section,
docs/robust.md): the plain weighted mean, no clipping, any claimed sample count (2³²−1
is the largest a claim can be). What the decoders refuse (a malformed body, a non-finite
value, ``method.max_scalar``) stays refused: that is the wire's contract, not a setting."""

MEDIAN = ["robust.aggregator=median"]
"""The arm with the coordinate-wise median instead of the streaming mean: it holds the
round's updates (cohort × trained tensors) and so is not the default, but no update at
an honest norm can pull a coordinate past the honest clients' values (sign_flip)."""

METHODS: dict[str, list[str]] = {
    "fedavg": ["method.name=fedavg"],
    "fedit": ["method.name=fedit"],
    "flasc": ["method.name=flasc"],
    # examples/fedkseed-tiny.toml's zeroth-order settings (tiny.toml's are first-order),
    # at lr 3e-4: its 1e-3 diverges with 3 iid clients (held-out loss 5.575 -> 5.55 after
    # 10 rounds, above 5.78 on the way), 3e-4 descends steadily (-> 5.399), 1e-4 barely
    # moves (-> 5.522)
    "fedkseed": ["method.name=fedkseed", "method.num_seeds=64", "method.eps=1e-3",
                 "clients.local_steps=20", "clients.batch_size=1", "clients.lr=3e-4"],
}
"""Overrides of ``examples/tiny.toml`` per method."""

SETTING = ["data.num_clients=3", "data.partition=iid", "clients.per_round=3",
           "eval.metrics=['loss']"]
"""Overrides of ``examples/tiny.toml`` for every run: 3 clients, all sampled every round."""

ATTACKER = ["faults.malicious_fraction=0.3333333333333333"]
"""One of the 3 clients is malicious, the same one every round."""


ATTACKER_DROPPED = "attacker_dropped"
"""The row of the best any defence can do: the malicious client sends NaN, which every
decoder refuses, so each round aggregates the honest clients' updates only. An attack
whose loss is near this row's was stopped; the gap between this row and the clean run is
what losing one client of three costs, which no defence can win back."""


MIXED_FAULTS = "mixed_faults"
MIXED = ["data.num_clients=10", "clients.per_round=5", "faults.dropout=0.3",
         "faults.malicious_fraction=0.1", f"faults.attack={list(ATTACKS)}"]
"""The run that must complete: 10 clients, 5 a round, each sampled client silent with
probability 0.3, and one in ten malicious, with every attack mixed. Its loss is not
compared with the clean run's (a different cohort): it shows the run finishes."""


def overrides_known(overrides: list[str]) -> str | None:
    """None when this fedbits accepts ``overrides``, else why not."""
    try:
        load_config(TINY, overrides)
    except ConfigError as e:
        return str(e)
    return None


def summarise(run_dir: Path, seconds: float) -> dict[str, Any]:
    """The run's final held-out loss and what happened to the attacked updates."""
    run = load_run(run_dir)
    losses = run.series("eval_loss")
    rejected = {hit for hits in run.rejections().values() for hit in hits}
    attacked = [hit for kind, hits in run.injected_faults().items()
                if kind.startswith("attack") for hit in hits]
    accepted, sampled = run.accepted_updates()
    return {
        "final_eval_loss": losses[-1][2] if losses else None,
        "attacked_updates": len(attacked),
        "rejected_attacked_updates": sum(hit in rejected for hit in attacked),
        "accepted_updates": accepted,
        "sampled_updates": sampled,
        "seconds": round(seconds, 1),
    }


def one_run(out_dir: str, name: str, overrides: list[str]) -> dict[str, Any]:
    """Run and summarise; a run that fails (no update accepted, a diverged model) is
    recorded with its error, since that too is what an attack can do."""
    cfg = load_config(TINY, [*overrides, f"run.out_dir={out_dir}", f"run.name={name}"])
    began = time.perf_counter()
    error = None
    try:
        run_experiment(cfg)
    except (FedbitsError, RuntimeError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
        logger.warning("%s: %s", name, error)
    if not (cfg.run_dir / "metrics.jsonl").is_file():
        return {"error": error}
    return {**summarise(cfg.run_dir, time.perf_counter() - began), "error": error}


def method_table(method: str, attacks: list[str], rounds: int, off: bool, extra: list[str],
                 out_dir: str) -> dict[str, Any]:
    """The clean runs and every attack's runs for one method."""
    base = [*SETTING, *METHODS[method], f"run.rounds={rounds}", f"eval.every={rounds}", *extra]
    arms = ({"defaults": []} | ({"defences_off": DEFENCES_OFF} if off else {})
            | ({} if method.startswith("fedkseed") else {"median": MEDIAN}))
    table: dict[str, Any] = {}
    for attack in ["clean", *attacks]:
        fault = [] if attack == "clean" else [*ATTACKER, f"faults.attack={attack}"]
        for arm, defences in arms.items():
            logger.info("== %s, %s, %s", method, attack, arm)
            result = one_run(out_dir, f"{method}-{attack}-{arm}", [*base, *fault, *defences])
            table.setdefault(attack, {})[arm] = result
    logger.info("== %s, %s", method, ATTACKER_DROPPED)
    table[ATTACKER_DROPPED] = {"defaults": one_run(
        out_dir, f"{method}-{ATTACKER_DROPPED}", [*base, *ATTACKER, "faults.attack=nan"])}
    logger.info("== %s, %s", method, MIXED_FAULTS)
    table[MIXED_FAULTS] = {"defaults": one_run(
        out_dir, f"{method}-{MIXED_FAULTS}", [*base, *MIXED])}
    clean = {arm: table["clean"][arm].get("final_eval_loss") for arm in arms}
    for attack in [*attacks, ATTACKER_DROPPED]:
        for arm, result in table[attack].items():
            loss = result.get("final_eval_loss")
            if loss is not None and clean[arm] is not None:
                result["loss_vs_clean"] = loss - clean[arm]
                result["loss_vs_clean_percent"] = round(100 * (loss / clean[arm] - 1), 2)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="one more override for every run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: a tiny model gains nothing from more, and idle "
                             "workers slow a shared machine down (raise it for a real model)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 2 rounds, fedit and fedkseed, two attacks")
    parser.add_argument("--out", type=Path, default=RESULTS / "attacks.json")
    args = parser.parse_args()
    configure(logging.WARNING)  # the attack runs' rejections; the table is logged below
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.methods = 2, ["fedit", "fedkseed"]
        args.attacks = ["scale", "random_bytes"]
    why_not = overrides_known(DEFENCES_OFF)
    if why_not is not None:
        logger.warning("the defences cannot be turned off in this fedbits (%s): the table has "
                       "the default runs only; set DEFENCES_OFF at the top of %s", why_not,
                       Path(__file__).name)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        table = {m: method_table(m, args.attacks, args.rounds, why_not is None,
                                 args.overrides, tmp) for m in args.methods}
    out = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "settings": {"config": "examples/tiny.toml", "rounds": args.rounds,
                     "overrides": SETTING + ATTACKER + args.overrides, "methods": METHODS,
                     "defences_off": DEFENCES_OFF if why_not is None else None,
                     "defences_off_skipped": why_not},
        "runs": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(table))
    for method, rows in table.items():
        for attack, arms in rows.items():
            logger.info("%-9s %-13s %s", method, attack,
                        "  ".join(f"{arm}: {_cell(r)}" for arm, r in arms.items()))
    logger.info("wrote %s", args.out)


def markdown(table: dict[str, Any]) -> str:
    """The table as docs/robust.md quotes it: final held-out loss per arm, its change
    against the same arm's clean run, and whether the attacked updates were rejected."""
    arms = list(dict.fromkeys(arm for rows in table.values() for arms in rows.values()
                              for arm in arms))
    lines = ["| method | attack | " + " | ".join(arms) + " |",
             "|---|---|" + "---|" * len(arms)]
    for method, rows in table.items():
        for attack, results in rows.items():
            cells = [_markdown_cell(results[arm]) if arm in results else ""
                     for arm in arms]
            lines.append(f"| {method} | {attack.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cell(result: dict[str, Any]) -> str:
    loss = result.get("final_eval_loss")
    if loss is None:
        return "failed"
    change = result.get("loss_vs_clean_percent")
    notes = [] if change is None else [f"{change:+.1f} %"]
    if result.get("attacked_updates") and (
            result["rejected_attacked_updates"] == result["attacked_updates"]):
        notes.append("rejected")
    return f"{loss:.3f}" + (f" ({', '.join(notes)})" if notes else "")


def _cell(result: dict[str, Any]) -> str:
    """One arm of the logged table: final loss and rejected/attacked updates."""
    loss = result.get("final_eval_loss")
    shown = "-" if loss is None else f"{loss:.4f}"
    return (f"loss {shown}, rejected {result.get('rejected_attacked_updates', 0)}"
            f"/{result.get('attacked_updates', 0)}" + (" (failed)" if result["error"] else ""))


if __name__ == "__main__":
    main()
