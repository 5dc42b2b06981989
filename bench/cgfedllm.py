"""CG-FedLLM against FedIT and FLASC at the same bytes: held-out loss, bytes, and how
well the autoencoder reconstructs client updates next to top-k at its bytes.

Runs ``examples/flasc.toml``'s setting (model, data, clients, LoRA and server
optimizer; ``--model tiny-llama`` for a smoke run) with the same seed and rounds:
``fedit`` (dense adapters both ways), ``cgfedllm`` (its defaults: TGAP 30 % of the
rounds, latent 1/64), then ``flasc`` at the density whose chains put the bytes of
cgfedllm's whole run (TGAP, encoder downloads and audits included) on the wire, found
from the chains' sizes on an adapter-sized vector (the run's own ledger is reported
beside it). Bytes come from the ledgers.

Writes ``bench/results/cgfedllm[_<tag>].json`` (and a ``.png`` of held-out loss against
cumulative bytes and of the reconstruction cosines per round when matplotlib is there).

    python bench/cgfedllm.py [--rounds 10] [--model tiny-llama] [--data builtin:tasks]
                             [--t0] [--eval-every N] [--eval-examples N]
                             [--set method.ae_epochs=50 ...] [--local-steps N]
                             [--batch-size N] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import torch
from flasc import LORA, REPO, RESULTS, T0, summarise  # bench/ is this script's folder

from fedbits.compress import parse_chain
from fedbits.config import Config
from fedbits.logs import configure
from fedbits.resolve import validate_references
from fedbits.runtime import run_experiment

logger = logging.getLogger("bench.cgfedllm")
FLASC = {"name": "flasc", "uplink": ["zstd"], "downlink": [],
         "error_feedback": True, "downlink_base": "init"}
"""FLASC with float32 values, as fedit and cgfedllm send them: with fp16 even its dense
density costs less than cgfedllm, whose downlink is fedit's, and no density would match."""
FIGURES = ("phase", "recon_cosine", "recon_rel_error", "topk_cosine", "topk_rel_error",
           "audit_recon_cosine", "encoder_version", "encoder_downloads", "ae_train_loss")


def per_round(run_dir: Path) -> list[dict[str, Any]]:
    """Each trained round: bytes per client both ways, and cgfedllm's figures."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = []
    for row in rows[1:]:
        n = max(len(row["clients"]), 1)
        out.append({"round": row["round"], "up_per_client": row["bytes_up"] / n,
                    "down_per_client": row["bytes_down"] / n, "cum_bytes": row["cum_bytes"],
                    "eval_loss": row.get("eval_loss"),
                    **{k: v for k, v in row["server_stats"].items() if k in FIGURES}})
    return out


def flasc_bytes(numel: int, density: float) -> int:
    """One client-round of flasc's chains on a random adapter-sized vector."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    up = parse_chain([f"topk:{density!r}", *FLASC["uplink"]], "up").encode(x)
    down = parse_chain([f"topk:{density!r}", *FLASC["downlink"]], "down").encode(x)
    return len(up) + len(down)


def matching_density(numel: int, per_client_round: float) -> float:
    """The flasc density whose client-round costs ``per_client_round`` bytes (bisection)."""
    low, high = 1 / numel, 1.0
    for _ in range(40):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if flasc_bytes(numel, mid) < per_client_round else (low, mid)
    return low


def plot(out: dict[str, Any], path: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("no matplotlib: no plot")
        return
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    loss_ax, cos_ax = fig.subplots(1, 2)
    for name, run in out["runs"].items():
        points = [(r["cum_bytes"] / 1e6, r["eval_loss"]) for r in run["rounds"]
                  if r["eval_loss"] is not None]
        loss_ax.plot(*zip(*points, strict=True), marker="o", label=name)
    loss_ax.set_xlim(left=0)
    loss_ax.set_xlabel("cumulative MB (all clients, both ways)")
    loss_ax.set_ylabel("held-out loss")
    loss_ax.legend(fontsize=8)
    faf = [r for r in out["runs"]["cgfedllm"]["rounds"] if "recon_cosine" in r]
    for key, label in (("recon_cosine", "autoencoder 1/64"), ("topk_cosine", "top-k, same bytes")):
        cos_ax.plot([r["round"] for r in faf], [r[key] for r in faf], marker="o", label=label)
    cos_ax.set_xlabel("round (FAF)")
    cos_ax.set_ylabel("cosine(update, reconstruction)")
    cos_ax.set_ylim(-0.1, 1.05)
    cos_ax.legend(fontsize=8)
    for ax in (loss_ax, cos_ax):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"cgfedllm vs fedit vs flasc: {out['setting']['model']['name']}, "
                 f"{out['setting']['data']['source']}, {out['setting']['run']['rounds']} rounds")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", default="smollm2-135m", help="tiny-llama for a smoke run")
    parser.add_argument("--data", default="builtin:tasks", help="data.source")
    parser.add_argument("--t0", action="store_true", help="one T0 task per client")
    parser.add_argument("--eval-every", type=int, default=0, help="default: the last round")
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out examples")
    parser.add_argument("--set", dest="cg", action="append", default=[], metavar="method.K=V",
                        help="a cgfedllm option (TOML value), e.g. method.ae_epochs=50")
    parser.add_argument("--local-steps", type=int, help="clients.local_steps (default: the "
                        "example's 6; fewer for a CPU)")
    parser.add_argument("--batch-size", type=int, help="clients.batch_size (default: the "
                        "example's 8)")
    parser.add_argument("--tag", help="appended to the results file name")
    args = parser.parse_args()
    configure()
    base = tomllib.loads((REPO / "examples" / "flasc.toml").read_text())
    base["run"]["rounds"] = args.rounds
    base["model"]["name"] = args.model
    base["data"]["source"] = args.data
    for key, value in (("local_steps", args.local_steps), ("batch_size", args.batch_size)):
        if value is not None:
            base["clients"][key] = value
    # held-out loss at round 0 and the end (--eval-every for a curve: evaluation can cost
    # more than a round on a busy CPU)
    base["eval"].update(metrics=["loss"], every=args.eval_every or args.rounds,
                        max_examples=args.eval_examples)
    if args.t0:
        if not T0.is_dir():
            raise SystemExit(f"{T0} is absent: the T0 comparison needs the shared data")
        tasks = len(list((T0 / "train").glob("*.jsonl*")))
        base["data"] = {"source": str(T0 / "train"), "partition": "natural",
                        "partition_by": "task", "num_clients": tasks,
                        "eval_source": str(T0 / "heldout")}
    shared = {k: v for k, v in base["method"].items() if k in LORA or k.startswith("server_")}
    cg = {"name": "cgfedllm", **{kv.split("=", 1)[0].removeprefix("method."):
                                 tomllib.loads(f"v = {kv.split('=', 1)[1]}")["v"]
                                 for kv in args.cg}}
    out: dict[str, Any] = {"setting": {k: base[k] for k in ("run", "model", "data", "clients")},
                           "shared_method_settings": shared, "cgfedllm_options": cg, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:

        def run(name: str, method: dict[str, Any]) -> None:
            raw = {**base, "run": {**base["run"], "out_dir": tmp, "name": name.split()[0]},
                   "method": {**method, **shared}}
            cfg = Config.model_validate(raw)
            validate_references(cfg)
            logger.info("== %s", name)
            began = time.perf_counter()
            run_dir = run_experiment(cfg)
            rounds = per_round(run_dir)
            out["runs"][name] = {**summarise(run_dir), "rounds": rounds,
                                 "total_bytes": rounds[-1]["cum_bytes"],
                                 "final_eval_loss": rounds[-1]["eval_loss"],
                                 "wall_seconds": time.perf_counter() - began}

        run("fedit", {"name": "fedit"})
        run("cgfedllm", cg)
        cgr = out["runs"]["cgfedllm"]
        numel = round((out["runs"]["fedit"]["up_per_client_round"] - 64) / 4)
        density = matching_density(numel, cgr["bytes_per_client_round"])
        run(f"flasc {density:.5f}", {**FLASC, "density_up": density, "density_down": density})
    faf = [r for r in cgr["rounds"] if r.get("phase") == 1]
    tgap = [r for r in cgr["rounds"] if r.get("phase") == 0]
    if faf and tgap:
        cgr["faf_up_per_client_round"] = sum(r["up_per_client"] for r in faf) / len(faf)
        cgr["tgap_up_per_client_round"] = sum(r["up_per_client"] for r in tgap) / len(tgap)
        cgr["faf_uplink_vs_dense"] = cgr["faf_up_per_client_round"] / cgr[
            "tgap_up_per_client_round"]
    dense = out["runs"]["fedit"]["total_bytes"]
    for r in out["runs"].values():
        r["bytes_vs_fedit"] = dense / r["total_bytes"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("_t0" if args.t0 else "") + ("" if args.model == "smollm2-135m" else f"_{args.model}")
    suffix += f"_{args.tag}" if args.tag else ""
    path = RESULTS / f"cgfedllm{suffix}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, path.with_suffix(".png"))
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
