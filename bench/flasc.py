"""FLASC against FedIT: bytes per client per round and held-out quality.

Runs ``examples/flasc.toml``'s setting (``smollm2-135m``, ``builtin:tasks``, same
seed, same clients, same rounds, same LoRA and server optimizer) with ``fedit``
(dense adapters both ways) and with ``flasc`` at densities 1/4, 1/16 and 1/64 (both
directions), plus ``flasc`` at 1/64 without error feedback. Bytes come from the
ledger (every index and framing byte included). Also times the codec chains on an
adapter-sized vector to report compression's share of a client's round.

With ``--t0`` (when ``../shared/data/t0`` exists) the same runs use one T0 task per
client from ``t0/train`` and Rouge-L on ``t0/heldout``.

Writes ``bench/results/flasc.json`` (or ``flasc_t0.json``).

    python bench/flasc.py [--rounds 3] [--t0] [--only fedit 'flasc 1/16'] [--server-avg]
                          [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tomllib
from pathlib import Path

import torch

from fedbits.compress import parse_chain
from fedbits.config import Config
from fedbits.logs import configure
from fedbits.resolve import validate_references
from fedbits.runtime import run_experiment

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
T0 = REPO.parent / "shared" / "data" / "t0"
LORA = ("lora_r", "lora_alpha", "target_modules")


def runs() -> dict[str, dict]:
    """Method sections by run name (the example's LoRA settings in every one)."""
    # the tables in docs/compress.md evaluate the dense server adapter, as measured
    # before eval_masked (the masked download) became flasc's default
    flasc = {
        "name": "flasc", "uplink": ["fp16", "zstd"], "downlink": ["fp16"], "error_feedback": True,
        "eval_masked": False,
    }
    out = {"fedit": {"name": "fedit"}}
    for label, density in (("1/4", 0.25), ("1/16", 0.0625), ("1/64", 0.015625)):
        out[f"flasc {label}"] = {**flasc, "density_up": density, "density_down": density}
    out["flasc 1/64 no error feedback"] = {**out["flasc 1/64"], "error_feedback": False}
    # the downlink carries the change since the seeded initial adapter
    for label in ("1/16", "1/64"):
        out[f"flasc {label} from init"] = {**out[f"flasc {label}"], "downlink_base": "init"}
    return out


def summarise(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_client: dict[tuple[int, int], int] = {}
    up = down = 0
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        m = json.loads(line)
        key = (m["round"], m["client"])
        per_client[key] = per_client.get(key, 0) + m["bytes"]
        up += m["bytes"] if m["direction"] == "up" else 0
        down += m["bytes"] if m["direction"] == "down" else 0
    n = len(per_client)
    trained = rows[1:]
    return {
        "bytes_per_client_round": sum(per_client.values()) / n,
        "up_per_client_round": up / n,
        "down_per_client_round": down / n,
        "seconds_per_client": (
            sum(r["train_seconds"] for r in trained) / sum(len(r["clients"]) for r in trained)
        ),
        "eval": [
            {k: v for k, v in r.items() if k.startswith("eval_") or k in ("rougeL", "exact_match")}
            for r in rows
        ],
        "rejected": sum(len(r["rejected"]) for r in rows),
    }


def codec_seconds(numel: int, up: list[str], down: list[str]) -> float:
    """Median seconds a client spends in codecs: decode the downlink, encode + check the uplink."""
    x = torch.randn(numel)
    gen = torch.Generator().manual_seed(0)
    up_chain, down_chain = parse_chain(up, field="up"), parse_chain(down, field="down")
    down_payload = down_chain.encode(x, generator=gen)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        down_chain.decode_sparse(down_payload, numel=numel, what="bench")
        payload = up_chain.encode(x, generator=gen)
        # error feedback decodes its own payload
        up_chain.decode(payload, numel=numel, what="bench")
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--t0", action="store_true", help="one T0 task per client, Rouge-L")
    parser.add_argument("--model", default="smollm2-135m", help="tiny-llama for a smoke run")
    parser.add_argument("--server-avg", action="store_true",
                        help="every run uses plain averaging (server lr 1) instead of the "
                             "example's server")
    parser.add_argument("--only", nargs="+", metavar="RUN", choices=list(runs()),
                        help="run only these (e.g. --only fedit 'flasc 1/16' for a longer "
                             "comparison)")
    parser.add_argument("--tag", help="appended to the results file name, to keep earlier results")
    args = parser.parse_args()
    configure()  # each run's progress lines, as `fedbits run` shows them
    if args.only and "fedit" not in args.only:
        parser.error("--only needs fedit: every figure is relative to it")
    base = tomllib.loads((REPO / "examples" / "flasc.toml").read_text())
    base["run"]["rounds"] = args.rounds
    base["eval"]["every"] = args.rounds  # round 0 and the last: what the comparison needs
    # exact match is 0.00 at round 0 and generation dominates a run: compare held-out loss
    if not args.t0:
        base["eval"]["metrics"] = ["loss"]
    base["model"]["name"] = args.model
    if args.server_avg:
        base["method"] = {k: v for k, v in base["method"].items() if not k.startswith("server_")}
        base["method"].update(server_opt="avg", server_lr=1.0)
    # fedit gets the same LoRA and the same server optimizer as every flasc run
    server = [*LORA, *(k for k in base["method"] if k.startswith("server_"))]
    if args.t0:
        if not T0.is_dir():
            raise SystemExit(f"{T0} is absent: the T0 comparison needs the shared data")
        tasks = len(list((T0 / "train").glob("*.jsonl*")))  # natural: one client per task file
        base["data"] = {"source": str(T0 / "train"), "partition": "natural", "partition_by": "task",
                        "num_clients": tasks, "eval_source": str(T0 / "heldout")}
        base["eval"]["metrics"] = ["loss", "rougeL"]
        base["eval"]["max_new_tokens"] = 32
    out: dict = {"setting": {k: base[k] for k in ("run", "model", "data", "clients", "eval")},
                 "lora": {k: base["method"][k] for k in server}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, method in runs().items():
            if args.only and name not in args.only:
                continue
            run_name = name.replace(" ", "_").replace("/", "-")
            raw = {**base, "run": {**base["run"], "out_dir": tmp, "name": run_name},
                   "method": {**method, **{k: base["method"][k] for k in server}}}
            cfg = Config.model_validate(raw)
            validate_references(cfg)
            print(f"== {name}", flush=True)
            out["runs"][name] = summarise(run_experiment(cfg))
    dense = out["runs"]["fedit"]["bytes_per_client_round"]
    for r in out["runs"].values():
        r["bytes_vs_fedit"] = dense / r["bytes_per_client_round"]
    # compression's share of a client's round, on a vector the size of the adapter
    numel = round((out["runs"]["fedit"]["up_per_client_round"] - 64) / 4)
    for label, density in (("1/16", 0.0625), ("1/64", 0.015625)):
        if f"flasc {label}" not in out["runs"]:
            continue
        seconds = codec_seconds(
            numel, [f"topk:{density}", "fp16", "zstd"], [f"topk:{density}", "fp16"]
        )
        per_client = out["runs"][f"flasc {label}"]["seconds_per_client"]
        out["runs"][f"flasc {label}"]["codec_seconds"] = seconds
        out["runs"][f"flasc {label}"]["codec_share_of_client_round"] = seconds / per_client
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("_t0" if args.t0 else "") + ("" if args.model == "smollm2-135m" else f"_{args.model}")
    suffix += "" if args.rounds == 3 else f"_{args.rounds}rounds"
    suffix += "_avg" if args.server_avg else ""
    suffix += f"_{args.tag}" if args.tag else ""
    path = RESULTS / f"flasc{suffix}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
