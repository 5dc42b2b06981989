"""The embedded simulator: every client in this process, every message still bytes.

One round: sample clients (seeded by run seed and round, so a resumed run samples
the same), move each downlink and uplink as encoded bytes through the ledger,
reject bad clients without stopping the round, aggregate, evaluate, append a metrics
row, checkpoint, then commit client-store writes.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from fedbits.errors import FedbitsError
from fedbits.eval import evaluate
from fedbits.methods import ClientData, ClientUpdate, get_method
from fedbits.report.fmt import format_bytes
from fedbits.runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, truncate_to
from fedbits.runtime.setup import RunSetup, derive_seed
from fedbits.runtime.store import ClientStores
from fedbits.wire import Ledger

CHECKPOINT = "checkpoints/latest.pt"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sample_clients(setup: RunSetup, round_: int) -> list[int]:
    eligible = setup.eligible_clients()
    k = min(setup.cfg.clients_per_round(), len(eligible))
    rng = random.Random(derive_seed(setup.cfg.run.seed, "sample", round_))
    return sorted(rng.sample(eligible, k))


def _summary_line(row: dict[str, Any], rounds: int) -> str:
    parts = [f"round {row['round']}/{rounds}"]
    if row["round"] > 0:
        n = max(len(row["clients"]), 1)
        parts += [
            f"clients {len(row['clients'])}"
            + (f" ({len(row['rejected'])} rejected)" if row["rejected"] else ""),
            f"up {format_bytes(row['bytes_up'])} ({format_bytes(row['bytes_up'] / n)}/client)",
            f"down {format_bytes(row['bytes_down'])} ({format_bytes(row['bytes_down'] / n)}/client)",
        ]
        if row["train_loss"] is not None:
            parts.append(f"train_loss {row['train_loss']:.4f}")
    for key in ("eval_loss", "perplexity", "rougeL", "exact_match"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}" if key == "eval_loss" else f"{key} {row[key]:.2f}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


class Simulation:
    def __init__(self, setup: RunSetup, run_dir: Path, log: Callable[[str], None] = print) -> None:
        self.setup = setup
        self.cfg = setup.cfg
        self.run_dir = run_dir
        self.log = log
        ctx = setup.method_context()
        spec = get_method(self.cfg.method.name)
        self.server = spec.server(ctx)
        self.client = spec.client(ctx)
        self.stores = ClientStores(run_dir / "client_store")
        self.metrics_path = run_dir / "metrics.jsonl"
        self.ledger = Ledger(run_dir / "ledger.jsonl")
        self.cum_bytes = 0
        self.show_progress = sys.stderr.isatty()

    # -- resume -------------------------------------------------------------------
    def resume(self) -> int:
        """Restore the last checkpoint; return the next round to run."""
        ckpt = load_checkpoint(self.run_dir / CHECKPOINT)
        self.server.load_state_dict(ckpt.server)
        self.cum_bytes = ckpt.cum_bytes
        truncate_to(self.metrics_path, ckpt.file_sizes["metrics.jsonl"])
        truncate_to(self.ledger.path, ckpt.file_sizes["ledger.jsonl"])
        self.stores.recover(ckpt.round)
        self.log(f"resumed after round {ckpt.round}")
        return ckpt.round + 1

    def _checkpoint(self, round_: int) -> None:
        sizes = {
            p.name: p.stat().st_size if p.exists() else 0
            for p in (self.metrics_path, self.ledger.path)
        }
        save_checkpoint(
            self.run_dir / CHECKPOINT,
            Checkpoint(round_, self.server.state_dict(), sizes, self.cum_bytes),
        )
        self.stores.commit(round_)

    # -- one round ----------------------------------------------------------------
    def _client_round(self, round_: int, client: int, progress: tqdm) -> ClientUpdate:
        examples = self.setup.clients[client]
        items, _ = self.setup.tokenize(examples)
        data = ClientData(items, self.setup.pad_id, derive_seed(self.cfg.run.seed, round_, client))
        down = self.server.downlink(round_, client)
        self.ledger.record(round_, client, "down", down)
        up = self.client.update(round_, client, down, data, self.stores.for_client(client, round_))
        self.ledger.record(round_, client, "up", up)
        self._client_stats[str(client)] = dict(getattr(self.client, "last_stats", {}))
        progress.update(1)
        return self.server.decode_uplink(round_, client, up)

    def run_round(self, round_: int) -> dict[str, Any]:
        start = time.perf_counter()
        self._client_stats: dict[str, dict[str, float]] = {}
        chosen = sample_clients(self.setup, round_)
        updates: list[ClientUpdate] = []
        rejected: dict[str, str] = {}
        with tqdm(
            total=len(chosen), desc=f"round {round_}", unit="client",
            disable=not self.show_progress, leave=False,
        ) as progress:
            for client in chosen:
                try:
                    updates.append(self._client_round(round_, client, progress))
                except Exception as e:  # a bad client never stops the round
                    reason = str(e) if isinstance(e, FedbitsError) else f"{type(e).__name__}: {e}"
                    rejected[str(client)] = reason
                    self.log(f"round {round_}: client {client} rejected: {reason}")
        if updates:
            self.server.aggregate(round_, updates)
        else:
            self.log(f"round {round_}: no valid update; the global model is unchanged")
        book = self.ledger.rounds.pop(round_, None)
        up = dict(book.up) if book else {}
        down = dict(book.down) if book else {}
        self.cum_bytes += sum(up.values()) + sum(down.values())
        total_samples = sum(u.num_samples for u in updates)
        return {
            "round": round_,
            "clients": chosen,
            "rejected": rejected,
            "bytes_up": sum(up.values()),
            "bytes_down": sum(down.values()),
            "bytes_up_per_client": {str(c): n for c, n in up.items()},
            "bytes_down_per_client": {str(c): n for c, n in down.items()},
            "cum_bytes": self.cum_bytes,
            "train_loss": (
                sum(u.train_loss * u.num_samples for u in updates) / total_samples
                if updates else None
            ),
            "train_seconds": time.perf_counter() - start,
            # what a method measures inside its halves (e.g. FedKSeed's replay time)
            "client_stats": self._client_stats,
            **dict(getattr(self.server, "last_stats", {}) if updates else {}),
        }

    def evaluate(self) -> dict[str, float]:
        return evaluate(
            self.server.global_model(),
            self.setup.tokenizer,
            self.setup.eval_examples,
            self.setup.eval_items,
            self.cfg.eval,
            self.cfg.clients.max_length,
        )

    def _write_row(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.log(_summary_line(row, self.cfg.run.rounds))

    # -- the loop -----------------------------------------------------------------
    def run(self, first_round: int = 1) -> None:
        rounds = self.cfg.run.rounds
        if first_round == 1:
            start = time.perf_counter()
            row = {"round": 0, "clients": [], "rejected": {}, "bytes_up": 0, "bytes_down": 0,
                   "bytes_up_per_client": {}, "bytes_down_per_client": {}, "cum_bytes": 0,
                   "train_loss": None, **self.evaluate()}
            row.update(seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
            self._write_row(row)
            self._checkpoint(0)
        for round_ in tqdm(range(first_round, rounds + 1), desc="rounds", unit="round",
                           initial=first_round - 1, total=rounds,
                           disable=not self.show_progress):
            start = time.perf_counter()
            row = self.run_round(round_)
            if round_ % self.cfg.eval.every == 0 or round_ == rounds:
                row.update(self.evaluate())
            row.update(seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
            self._write_row(row)
            self._checkpoint(round_)
