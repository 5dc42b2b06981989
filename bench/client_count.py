"""Is the simulator flat in the number of clients? The same run with 100 and 10,000.

The tiny model, flasc with error feedback (every sampled client reads and writes a
residual in its client store), 10 clients a round, 20 rounds, evaluation (loss only)
at the last round. Both runs share the same data: ``builtin:tasks`` with 1000 examples
per family (10,800 training examples, so each of 10,000 clients holds one or two, iid).
``clients.batch_size = 1`` keeps a client's work the same in both runs: with a larger
batch the clients holding one example would train on smaller batches and look faster.

Each run is its own process. Reported per run: seconds per round (the mean over rounds
2..20: round 1 warms up; the mean over all rounds too), the resident-memory high-water
mark of the round loop (``VmHWM``, reset after start-up by writing 5 to
``/proc/self/clear_refs``), the whole process's peak (start-up included), the start-up
seconds, and what the client store and the token cache hold. The targets are the
10,000-client run over the 100-client run: round-loop peak RSS <= 1.10, seconds per
round <= 1.2. Other jobs on the machine distort the seconds: the load average at the
start and end of each run is recorded, and each run uses one torch thread.

Writes ``bench/results/client_count.json``.

    python bench/client_count.py [--clients 100 10000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TARGET_RSS = 1.10
TARGET_SECONDS = 1.2
PER_TASK = 1000


def _status_kb(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status``, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water_mark() -> bool:
    """Set ``VmHWM`` back to the current RSS (Linux 4.0+); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def overrides(clients: int, rounds: int, out_dir: Path) -> list[str]:
    return [
        f"run.out_dir={out_dir}", f"run.name=clients{clients}", f"run.rounds={rounds}",
        "method.name=flasc", "method.error_feedback=true",
        f"data.num_clients={clients}", "data.partition=iid", f"data.builtin_per_task={PER_TASK}",
        "clients.per_round=10", "clients.batch_size=1",
        f"eval.every={rounds}", "eval.metrics=['loss']", "eval.max_examples=16",
    ]


def child(clients: int, rounds: int, threads: int) -> dict[str, Any]:
    """One run in this process; what it measured."""
    import torch

    from fedbits.resolve import load_config
    from fedbits.runtime import open_run_dir
    from fedbits.runtime.setup import prepare_run
    from fedbits.runtime.simulation import Simulation

    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "examples" / "tiny.toml", overrides(clients, rounds, Path(tmp)))
        began = time.perf_counter()
        setup = prepare_run(cfg)
        loop = Simulation(setup, cfg.run_dir)
        run_dir = open_run_dir(cfg, resume=False, overwrite=False)
        startup_seconds = time.perf_counter() - began
        startup_rss_kb = _status_kb("VmRSS")
        reset = _reset_high_water_mark()
        loop.run(0)
        loop_hwm_kb = _status_kb("VmHWM")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        seconds = [r["seconds"] for r in rows if r["round"] > 0]
        sampled = {c for r in rows for c in r["clients"]}
        sizes = [len(c) for c in setup.clients]
        result = {
            "clients": clients,
            "client_sizes": [min(sizes), max(sizes)],
            "distinct_clients_sampled": len(sampled),
            "startup_seconds": startup_seconds,
            "seconds_per_round": seconds,
            "mean_seconds_after_round_1": sum(seconds[1:]) / max(len(seconds) - 1, 1),
            "mean_seconds_all_rounds": sum(seconds) / len(seconds),
            "startup_rss_mb": startup_rss_kb / 1024,
            "loop_peak_rss_mb": loop_hwm_kb / 1024 if reset else None,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "client_store": {
                "budget_mb": cfg.runtime.client_state_mb,
                "memory_bytes": loop.stores.memory_bytes(),
                "memory_values": loop.stores.memory_entries(),
                "disk_bytes": loop.stores.size_bytes(),
                **loop.stores.counters.as_dict(),
            },
            "token_cache": {"clients_tokenised": loop.tokens.tokenized,
                            "array_bytes": loop.tokens.nbytes()},
            "final_eval_loss": rows[-1].get("eval_loss"),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        }
    return result


def run_child(clients: int, rounds: int, threads: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(clients), "--rounds", str(rounds),
         "--threads", str(threads)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"the {clients}-client run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b / a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs=2, default=[100, 10_000],
                        metavar=("FEW", "MANY"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.rounds, args.threads)))
        return

    import torch

    load_start = os.getloadavg()
    few, many = (run_child(n, args.rounds, args.threads) for n in args.clients)
    rss = _ratio(few["loop_peak_rss_mb"], many["loop_peak_rss_mb"])
    process_rss = _ratio(few["process_peak_rss_mb"], many["process_peak_rss_mb"])
    secs = _ratio(few["mean_seconds_after_round_1"], many["mean_seconds_after_round_1"])
    result = {
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads_per_run": args.threads,
        },
        "loadavg_start": load_start,
        "settings": {
            "model": "tiny-llama", "method": "flasc + error_feedback", "per_round": 10,
            "rounds": args.rounds, "batch_size": 1, "data": f"builtin:tasks x {PER_TASK}, iid",
            "overrides": overrides(args.clients[1], args.rounds, Path("<tmp>")),
        },
        "runs": {str(few["clients"]): few, str(many["clients"]): many},
        "ratios": {
            "loop_peak_rss": rss,
            "process_peak_rss": process_rss,
            "seconds_per_round_after_round_1": secs,
            "seconds_per_round_all": _ratio(few["mean_seconds_all_rounds"],
                                            many["mean_seconds_all_rounds"]),
        },
        "targets": {
            "loop_peak_rss": f"<= {TARGET_RSS}", "seconds_per_round": f"<= {TARGET_SECONDS}",
            "met": {
                "loop_peak_rss": rss is not None and rss <= TARGET_RSS,
                "process_peak_rss": process_rss is not None and process_rss <= TARGET_RSS,
                "seconds_per_round": secs is not None and secs <= TARGET_SECONDS,
            },
        },
        "loadavg_end": os.getloadavg(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "client_count.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
