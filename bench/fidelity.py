"""Every method in its paper mode on T0 with one task per client, tuned with the same
budget and evaluated with confidence intervals on two held-out sources.

What one command measures, per method (paper modes, :data:`METHODS`):

* the same seed, rounds, clients a round and data: ``../shared/data/t0/train``, one task
  file per client (``partition = "natural"``, by task);
* tuning: each method runs the first ``--trials`` entries of its own sweep
  (:func:`trials`: server optimiser and client learning rate for the methods that have a
  server optimiser, the client learning rate around the paper's for the others), so every
  method gets the same number of trials. The trial kept is the one with the lowest loss
  on a **validation split** (``data.eval_fraction`` of the training tasks' examples,
  tasks the clients train on); the reported held-out sets never choose anything;
* quality of the kept trial on two held-out sources, fixed examples, greedy decoding:
  T0's held-out tasks (``t0/heldout``: 5 source datasets no client trains on) and the
  Alpaca demo instructions; Rouge-L and held-out loss each with a bootstrap 95 %
  confidence interval over the examples (:func:`bootstrap`);
* bytes up and down per client per round and the run's total, from the ledger; seconds
  per round; the client's peak memory (resident growth over the process during a client
  update, :class:`ClientPeak`).

Writes ``bench/results/fidelity[_<tag>].json``, ``.md`` (the table) and ``.png`` (quality
against total bytes). The reduced setting (default) is sized for a 2-core CPU in under an
hour, run alone on the machine; ``--full`` is the GPU setting (more rounds, clients,
steps, trials and examples). A row for the pretrained model, untrained, is the floor.

    python bench/fidelity.py [--full] [--methods fedit,flasc] [--trials N] [--rounds N]
                             [--examples N] [--tag NAME] [--model tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbits.config import Config
from fedbits.data.examples import load_examples
from fedbits.data.format import tokenize_all
from fedbits.data.types import Example
from fedbits.eval import eval_loss, greedy_generate, rouge_l
from fedbits.logs import configure
from fedbits.resolve import apply_client_defaults, validate_references

logger = logging.getLogger("fedbits.bench.fidelity")  # shown by fedbits.logs.configure
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "data"
T0 = SHARED / "t0"
ALPACA = SHARED / "alpaca_en_demo.json.gz"

LORA = {"lora_r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
AVG = {"server_opt": "avg", "server_lr": 1.0}
ADAM = {"server_opt": "fedadam", "server_lr": 1e-3, "server_beta2": 0.999, "server_eps": 1e-8}
ZO_CLIENTS = {"batch_size": 1}
"""Zeroth-order clients take many cheap steps on one example each (FedKSeed: τ 200,
batch 1); ``Setting.zo_steps`` scales τ to the machine."""


@dataclass(frozen=True)
class Entry:
    """One method in its paper's mode: options, the client learning rate its sweep centres
    on, whether it has a server optimiser to sweep, and what it changes in [clients] /
    [robust] (e.g. FedCyBGD's one client at a time, FLASC's unweighted mean)."""

    method: dict[str, Any]
    lr: float
    server_opt: bool
    clients: dict[str, Any] = field(default_factory=dict)
    robust: dict[str, Any] = field(default_factory=dict)
    zeroth_order: bool = False


METHODS: dict[str, Entry] = {
    "fedavg": Entry({"name": "fedavg"}, 1e-5, True),
    "fedit": Entry({"name": "fedit", **LORA}, 1e-3, True),
    # FLASC: 1/16 density both ways, error feedback, the masked download evaluated, the
    # plain mean over clients
    "flasc": Entry({"name": "flasc", **LORA, "density_up": 0.0625, "density_down": 0.0625,
                    "uplink": ["fp16", "zstd"], "downlink": ["fp16"], "error_feedback": True,
                    "downlink_base": "init", "eval_masked": True}, 1e-3, True,
                   robust={"server_weighting": "uniform"}),
    # Ro et al.: a quarter of the layers a round, cycling, rotated 4-bit uniform updates
    "partial": Entry({"name": "partial", "layer_fraction": 0.25, "placement": "top",
                      "schedule": "round", "uplink": ["hadamard", "uniform:bits=4,sr"]},
                     1e-5, True),
    # FedCyBGD: one client at a time around the cycle, optimiser state travelling
    "fedcybgd": Entry({"name": "fedcybgd", "schedule": "cycle", "download": "fraction",
                       "uplink": ["powersgd:rank=4"]}, 1e-5, False,
                      clients={"per_round": 1}),
    "fedkseed": Entry({"name": "fedkseed"}, 3e-6, False, clients=ZO_CLIENTS,
                      zeroth_order=True),
    "fedkseed-pro": Entry({"name": "fedkseed-pro"}, 3e-6, False, clients=ZO_CLIENTS,
                          zeroth_order=True),
    "cgfedllm": Entry({"name": "cgfedllm", **LORA}, 1e-3, True),
    "fedzo": Entry({"name": "fedzo"}, 3e-6, False, clients=ZO_CLIENTS, zeroth_order=True),
}


def trials(entry: Entry) -> list[tuple[float, dict[str, Any]]]:
    """The sweep, in the order trials are taken: (client lr, server optimiser options).
    A method with a server optimiser tries plain averaging and FedAdam before other
    learning rates; one without tries learning rates around its own."""
    lr = entry.lr
    if entry.server_opt:
        return [(lr, AVG), (lr, ADAM), (3 * lr, AVG), (lr / 3, AVG)]
    return [(lr, {}), (3 * lr, {}), (lr / 3, {}), (10 * lr, {})]


@dataclass(frozen=True)
class Setting:
    rounds: int
    per_round: int
    local_steps: int
    zo_steps: int
    batch_size: int
    trials: int
    examples: int  # per held-out source
    validation: int  # validation examples evaluated
    max_new_tokens: int


REDUCED = Setting(rounds=3, per_round=2, local_steps=2, zo_steps=16, batch_size=4, trials=2,
                  examples=48, validation=32, max_new_tokens=32)
FULL = Setting(rounds=20, per_round=5, local_steps=10, zo_steps=200, batch_size=4, trials=4,
               examples=500, validation=200, max_new_tokens=64)


def base_config(setting: Setting, model: str, seed: int) -> dict[str, Any]:
    tasks = len(list((T0 / "train").glob("*.jsonl*")))
    return {
        "run": {"seed": seed, "rounds": setting.rounds},
        "model": {"name": model},
        "data": {"source": str(T0 / "train"), "partition": "natural", "partition_by": "task",
                 "num_clients": tasks, "eval_split": "fraction", "eval_fraction": 0.02},
        "clients": {"per_round": setting.per_round, "local_steps": setting.local_steps,
                    "batch_size": setting.batch_size, "max_length": 128},
        # the validation loss, once at the end: what chooses the trial
        "eval": {"metrics": ["loss"], "every": setting.rounds,
                 "max_examples": setting.validation, "batch_size": 8},
    }


def trial_config(base: dict[str, Any], setting: Setting, name: str, entry: Entry, lr: float,
                 server: dict[str, Any], out_dir: str, run_name: str) -> Config:
    clients = {**base["clients"], **entry.clients, "lr": lr}
    if entry.zeroth_order:
        clients["local_steps"] = setting.zo_steps
    raw = {**base, "run": {**base["run"], "out_dir": out_dir, "name": run_name},
           "clients": clients, "method": {**entry.method, **server}}
    if entry.robust:
        raw["robust"] = entry.robust
    cfg = Config.model_validate(raw)
    apply_client_defaults(cfg)  # what a method declares for the keys left out, as a run does
    validate_references(cfg)
    return cfg


# -- measuring ----------------------------------------------------------------------


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


class ClientPeak:
    """Wraps a client half's ``update``: the peak resident memory it adds over what the
    process held when it began (Linux: the VmHWM mark is reset to VmRSS first)."""

    def __init__(self, update: Callable[..., Any]) -> None:
        self.update, self.peak_mb = update, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        before = _status_mb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return self.update(*args, **kwargs)
        result = self.update(*args, **kwargs)
        self.peak_mb = max(self.peak_mb, _status_mb("VmHWM") - before)
        return result


def bootstrap(values: Sequence[float], weights: Sequence[float] | None = None,
              resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """The (weighted) mean and its percentile bootstrap 95 % interval over examples."""
    w = list(weights) if weights is not None else [1.0] * len(values)
    n = len(values)

    def mean(idx: Sequence[int]) -> float:
        total = sum(w[i] for i in idx)
        return sum(values[i] * w[i] for i in idx) / total if total else math.nan

    point = mean(range(n))
    rng = random.Random(seed)
    means = sorted(mean([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return point, means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


@dataclass
class EvalSet:
    name: str
    examples: list[Example]
    items: list[Any]


def eval_sets(tokenizer: Any, setting: Setting, seed: int, max_length: int) -> list[EvalSet]:
    """The held-out sources, the same fixed examples for every method."""
    sets = []
    for name, source in (("t0_heldout", T0 / "heldout"), ("alpaca", ALPACA)):
        examples = load_examples(str(source), seed=seed, max_examples=setting.examples)
        items, _ = tokenize_all(tokenizer, examples, max_length)
        sets.append(EvalSet(name, examples, items))
    return sets


def quality(model: Any, tokenizer: Any, sets: list[EvalSet], setting: Setting,
            max_length: int) -> dict[str, Any]:
    """Rouge-L and loss with their intervals on each held-out set."""
    out: dict[str, Any] = {}
    for s in sets:
        predictions = greedy_generate(model, tokenizer, [ex.prompt for ex in s.examples],
                                      max_length=max_length,
                                      max_new_tokens=setting.max_new_tokens, batch_size=8)
        scores = [rouge_l([p], [ex.completion]) for p, ex in zip(predictions, s.examples,
                                                                 strict=True)]
        per_example = [eval_loss(model, [item], 1, tokenizer.pad_token_id) for item in s.items]
        kept = [r for r in per_example if r["eval_tokens"]]
        loss = bootstrap([r["eval_loss"] for r in kept], [r["eval_tokens"] for r in kept])
        rouge = bootstrap(scores)
        out[s.name] = {"rougeL": rouge[0], "rougeL_ci": list(rouge[1:]),
                       "loss": loss[0], "loss_ci": list(loss[1:]), "examples": len(scores),
                       "samples": [{"prompt": s.examples[i].prompt[-200:],
                                    "prediction": predictions[i]} for i in range(2)]}
    return out


def ledger_figures(run_dir: Path) -> dict[str, float]:
    """Bytes per client per round both ways, the total, and seconds per round."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows[1:] if r["clients"]]
    client_rounds = sum(len(r["clients"]) for r in trained)
    up = sum(r["bytes_up"] for r in trained)
    down = sum(r["bytes_down"] for r in trained)
    return {"up_per_client_round": up / max(client_rounds, 1),
            "down_per_client_round": down / max(client_rounds, 1),
            "total_bytes": rows[-1]["cum_bytes"],
            "seconds_per_round": sum(r["train_seconds"] for r in rows[1:]) / max(len(rows) - 1, 1),
            "validation_loss": rows[-1].get("eval_loss", math.nan),
            "rejected": sum(len(r["rejected"]) for r in rows)}


def run_trial(cfg: Config) -> tuple[Any, dict[str, Any]]:
    """Run one trial to its end; returns the loop (its server still holds the model) and
    the trial's figures."""
    from fedbits.runtime import check_run_dir, execute, open_run_dir
    from fedbits.runtime.setup import prepare_run
    from fedbits.runtime.simulation import Simulation

    run_dir = check_run_dir(cfg, False, False)
    loop = Simulation(prepare_run(cfg), run_dir)
    peak = ClientPeak(loop.client.update)
    loop.client.update = peak  # type: ignore[method-assign]
    open_run_dir(cfg, False, False)
    began = time.perf_counter()
    execute(loop)
    figures = {**ledger_figures(run_dir), "client_peak_mb": peak.peak_mb,
               "wall_seconds": time.perf_counter() - began}
    return loop, figures


def finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def measure_method(name: str, entry: Entry, base: dict[str, Any], setting: Setting,
                   tmp: str, sets_for: Callable[[Any], list[EvalSet]]) -> dict[str, Any]:
    """Run the method's trials, keep the one with the lowest validation loss, evaluate it."""
    best: tuple[Any, dict[str, Any]] | None = None
    record = []
    for i, (lr, server) in enumerate(trials(entry)[: setting.trials]):
        cfg = trial_config(base, setting, name, entry, lr, server, tmp, f"{name}-{i}")
        logger.info("== %s trial %d: lr %g %s", name, i, lr, server or "")
        loop, figures = run_trial(cfg)
        figures.update(trial=i, lr=lr, server=server)
        record.append(figures)
        logger.info("   validation loss %.4f", figures["validation_loss"])
        if best is None or finite(figures["validation_loss"]) < finite(
                best[1]["validation_loss"]):
            best = (loop, figures)
        del loop
    assert best is not None
    loop, chosen = best
    tokenizer = loop.setup.tokenizer
    model = loop.server.global_model()
    result = {**chosen, "trials": record, "paper_mode": entry.method,
              "clients": {**entry.clients}, "robust": entry.robust,
              **quality(model, tokenizer, sets_for(tokenizer), setting,
                        loop.cfg.clients.max_length)}
    return result


def pretrained_row(base: dict[str, Any], setting: Setting, tmp: str,
                   sets_for: Callable[[Any], list[EvalSet]]) -> dict[str, Any]:
    """The untrained model on the same sets: the floor every method starts from."""
    from fedbits.models import load_model

    cfg = trial_config(base, setting, "fedavg", METHODS["fedavg"], 1e-5, AVG, tmp, "pretrained")
    model, tokenizer = load_model(cfg.model, seed=cfg.run.seed)
    return {"up_per_client_round": 0, "down_per_client_round": 0, "total_bytes": 0,
            **quality(model, tokenizer, sets_for(tokenizer), setting, cfg.clients.max_length)}


# -- writing ------------------------------------------------------------------------


def _ci(row: dict[str, Any], key: str, digits: int) -> str:
    point, (low, high) = row[key], row[key + "_ci"]
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _number(row: dict[str, Any], key: str, spec: str) -> str:
    value = row.get(key)
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _load(load: Sequence[float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def markdown(out: dict[str, Any]) -> str:
    s = out["setting"]
    lines = [
        f"Setting: {out['model']}, T0 one task per client ({out['num_clients']} clients), "
        f"{s['rounds']} rounds, {s['per_round']} clients a round (FedCyBGD's cycle: 1), "
        f"{s['local_steps']} local steps × {s['batch_size']} (zeroth order: {s['zo_steps']} "
        f"× 1), seed {out['seed']}; {s['trials']} trials per method chosen on validation "
        f"loss; {s['examples']} fixed examples per held-out set, greedy, {s['max_new_tokens']} "
        "new tokens; [95 % bootstrap CI].",
        "",
        "| method | up / client / round | down / client / round | total | T0 held-out Rouge-L "
        "| T0 held-out loss | Alpaca Rouge-L | Alpaca loss | validation loss | s/round "
        "| client peak MB | kept trial |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out["methods"].items():
        t0, alpaca = r["t0_heldout"], r["alpaca"]
        trial = ("—" if "lr" not in r else
                 f"lr {r['lr']:g}" + (f", {r['server']['server_opt']}" if r["server"] else ""))
        lines.append(
            f"| {name} | {_bytes(r['up_per_client_round'])} | {_bytes(r['down_per_client_round'])} "
            f"| {_bytes(r['total_bytes'])} | {_ci(t0, 'rougeL', 1)} | {_ci(t0, 'loss', 3)} "
            f"| {_ci(alpaca, 'rougeL', 1)} | {_ci(alpaca, 'loss', 3)} "
            f"| {_number(r, 'validation_loss', '.3f')} | {_number(r, 'seconds_per_round', '.1f')} "
            f"| {_number(r, 'client_peak_mb', ',.0f')} | {trial} |")
    lines += [f"| {name} | failed: {why} |" + " |" * 10 for name, why in out["failed"].items()]
    lines += ["", f"Load average (1, 5, 15 min) at start: {_load(out['load_start'])}, at end: "
              f"{_load(out['load_end'])}; "
              f"{out['wall_minutes']:.1f} minutes in all."]
    return "\n".join(lines) + "\n"


def plot(out: dict[str, Any], path: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("no matplotlib: no plot")
        return
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    for ax, key in zip(fig.subplots(1, 2), ("t0_heldout", "alpaca"), strict=True):
        for name, r in out["methods"].items():
            q = r[key]
            x = max(r["total_bytes"], 1) / 1e6
            ax.errorbar([x], [q["rougeL"]], yerr=[[q["rougeL"] - q["rougeL_ci"][0]],
                                                  [q["rougeL_ci"][1] - q["rougeL"]]],
                        fmt="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("total MB on the wire (all clients, both ways; pretrained at 1e-6)")
        ax.set_ylabel(f"Rouge-L, {key} (95 % CI)")
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(f"fidelity: {out['model']}, T0 one task per client, "
                 f"{out['setting']['rounds']} rounds")
    fig.savefig(path, dpi=110, bbox_inches="tight")


_EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""Every tensor of 64 KiB or more gets its own mapping, returned when freed, so a client's
peak is not hidden in heap pages the server half freed (set before the process starts)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the GPU setting")
    parser.add_argument("--methods", help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--trials", type=int, help="trials per method")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--examples", type=int, help="examples per held-out set")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", help="appended to the results' file names")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="write the .md and .png of an existing results file, run nothing")
    args = parser.parse_args()
    if args.render:
        out = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(out))
        plot(out, args.render.with_suffix(".png"))
        return
    if any(os.environ.get(k) != v for k, v in _EXACT_RSS.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_EXACT_RSS})
    configure()
    for path in (T0 / "train", T0 / "heldout", ALPACA):
        if not path.exists():
            raise SystemExit(f"{path} is absent: the fidelity benchmark needs ../shared/data")
    setting = FULL if args.full else REDUCED
    overrides = {"trials": args.trials, "rounds": args.rounds, "examples": args.examples}
    setting = Setting(**{**setting.__dict__,
                         **{k: v for k, v in overrides.items() if v is not None}})
    names = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    base = base_config(setting, args.model, args.seed)
    out: dict[str, Any] = {"model": args.model, "seed": args.seed,
                           "setting": setting.__dict__, "num_clients": base["data"]["num_clients"],
                           "sweep": {n: trials(METHODS[n])[: setting.trials] for n in names},
                           "load_start": os.getloadavg(), "methods": {}, "failed": {}}
    began = time.perf_counter()
    cache: list[EvalSet] = []

    def sets_for(tokenizer: Any) -> list[EvalSet]:
        if not cache:  # one tokenizer for every method: the same model family
            cache.extend(eval_sets(tokenizer, setting, args.seed, 128))
        return cache

    with tempfile.TemporaryDirectory() as tmp:
        out["methods"]["pretrained"] = pretrained_row(base, setting, tmp, sets_for)
        for name in names:
            try:
                out["methods"][name] = measure_method(name, METHODS[name], base, setting, tmp,
                                                      sets_for)
            except Exception as e:  # one method's failure must not cost the others' hour
                logger.exception("%s failed", name)
                out["failed"][name] = f"{type(e).__name__}: {e}"
    out["load_end"] = os.getloadavg()
    out["wall_minutes"] = (time.perf_counter() - began) / 60
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("_full" if args.full else "") + (f"_{args.tag}" if args.tag else "")
    path = RESULTS / f"fidelity{suffix}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(out))
    plot(out, path.with_suffix(".png"))
    logger.info("wrote %s (and .md, .png) in %.1f minutes", path, out["wall_minutes"])


if __name__ == "__main__":
    main()
