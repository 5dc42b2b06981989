"""The round loop every runtime shares: what happens to a run's bytes between rounds.

One round: sample clients (seeded by run seed and round, so a resumed run samples
the same); encode and seal every chosen client's downlink; let the runtime's
:meth:`RoundLoop.exchange` deliver them and bring back the uplinks (in this process
for the simulator, over Flower for real nodes); record every payload that crossed in
the ledger; open each uplink's envelope and decode it, rejecting bad clients without
stopping the round; aggregate, evaluate, append a metrics row, checkpoint, then let
the runtime commit the clients' store writes. Sampling, the envelope and the size
limit on the server's side, the order of delivery, ledger, rejection, metrics and
checkpoints live here once, so both runtimes produce the same run directory;
:mod:`.simulation` and :mod:`.flower.server_app` only move bytes.

The order rule: every downlink of a round is encoded before any uplink of it is
decoded, in every runtime, so a method whose downlink reads state that
``decode_uplink`` changes sends the same bytes in the simulator and on Flower.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from transformers import PreTrainedModel

from fedbits.data.format import Tokenized
from fedbits.errors import ConfigError, FedbitsError, NoUpdateAccepted
from fedbits.eval import evaluate
from fedbits.methods import ClientData, ClientUpdate, get_method
from fedbits.privacy import Accountant
from fedbits.progress import progress
from fedbits.report.fmt import format_bytes
from fedbits.runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, truncate_to
from fedbits.runtime.client import Reply, checked_stats
from fedbits.runtime.setup import RunSetup
from fedbits.seeding import derive_seed
from fedbits.wire import Direction, Ledger, open_envelope, seal

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/latest.pt"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sample_clients(setup: RunSetup, round_: int) -> list[int]:
    eligible = setup.eligible_clients()
    k = min(setup.cfg.clients_per_round(), len(eligible))
    rng = random.Random(derive_seed(setup.cfg.run.seed, "sample", round_))
    return sorted(rng.sample(eligible, k))


def client_data(setup: RunSetup, items: list[Tokenized], round_: int, client: int) -> ClientData:
    """A client's data for one round; the seed depends only on (run seed, round, client),
    so every runtime trains on the same batches."""
    return ClientData(items, setup.pad_id, derive_seed(setup.cfg.run.seed, round_, client))


def describe_error(e: Exception) -> str:
    """The reason recorded when a client is rejected: a fedbits error speaks for itself,
    anything else (a bug, a crash in a library) is named by its type."""
    return str(e) if isinstance(e, FedbitsError) else f"{type(e).__name__}: {e}"


Settle = Callable[[int, bytes, Reply], None]
"""``settle(client, downlink, reply)``: book one client's round once its reply is in."""


def _summary_line(row: dict[str, Any], rounds: int) -> str:
    parts = [f"round {row['round']}/{rounds}"]
    if row["round"] > 0:
        n = max(len(row["clients"]), 1)
        parts += [
            f"clients {len(row['clients'])}"
            + (f" ({len(row['rejected'])} rejected)" if row["rejected"] else ""),
            f"up {format_bytes(row['bytes_up'])} ({format_bytes(row['bytes_up'] / n)}/client)",
            f"down {format_bytes(row['bytes_down'])} "
            f"({format_bytes(row['bytes_down'] / n)}/client)",
        ]
        if row["train_loss"] is not None:
            parts.append(f"train_loss {row['train_loss']:.4f}")
        if row.get("dp_epsilon") is not None:
            parts.append(f"dp_epsilon {row['dp_epsilon']:.3g}")
    formats = {"eval_loss": "{:.4f}", "perplexity": "{:.2f}", "rougeL": "{:.2f} %",
               "exact_match": "{:.2f} %"}  # the generation metrics are percentages
    for key, fmt in formats.items():
        if key in row:
            parts.append(f"{key} {fmt.format(row[key])}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


class RoundLoop(ABC):
    """A run's server side, whatever carries the bytes; runtimes implement :meth:`exchange`."""

    server_half_only: bool = True
    """Whether the server half is the only half this process builds (on Flower it is; the
    simulator builds the client half after it)."""

    def __init__(self, setup: RunSetup, run_dir: Path) -> None:
        self.setup = setup
        self.cfg = setup.cfg
        self.run_dir = run_dir
        context = setup.method_context(last_half=self.server_half_only)
        self.server = get_method(self.cfg.method.name).server(context)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.ledger = Ledger(run_dir / "ledger.jsonl")
        self.cum_bytes = 0
        # [privacy]: the (ε, δ) of the models released so far, in every row; a round
        # samples its cohort from the clients eligible to be sampled
        self.accountant = (
            Accountant(self.cfg.privacy, self.cfg.clients_per_round(),
                       len(setup.eligible_clients()))
            if self.cfg.privacy is not None else None)
        # the last body sealed and its payload: a method that gives every client of a
        # round the same body object gets one sealed copy, not one per client
        self._sealed: tuple[bytes, bytes] | None = None

    # -- what a runtime provides ----------------------------------------------------
    @abstractmethod
    def exchange(self, round_: int, downlinks: dict[int, bytes], settle: Settle) -> None:
        """Deliver each client's sealed downlink and pass what came back to ``settle``,
        once per client, in the order of ``downlinks``.

        Every downlink of the round is already encoded (the order rule), so a runtime
        may send them in any order or all at once; only settling is ordered.
        """

    @abstractmethod
    def commit_clients(self, round_: int) -> None:
        """Round ``round_`` is checkpointed: the clients' store writes of it may commit."""

    @abstractmethod
    def recover_clients(self, round_: int) -> None:
        """Resuming after ``round_``: keep the store writes up to it, drop later ones."""

    # -- resume -------------------------------------------------------------------
    def resume(self) -> int:
        """Restore the last checkpoint; return the next round to run (0 when the run was
        stopped before round 0 was checkpointed: it starts again, dropping what it wrote)."""
        if not (self.run_dir / CHECKPOINT).is_file():
            truncate_to(self.metrics_path, 0)
            truncate_to(self.ledger.path, 0)
            self.recover_clients(-1)
            logger.info("no completed round to resume from: starting again at round 0")
            return 0
        ckpt = load_checkpoint(self.run_dir / CHECKPOINT)
        if ckpt.round > self.cfg.run.rounds:
            raise ConfigError(
                f"cannot resume {self.run_dir} with run.rounds={self.cfg.run.rounds}: it has "
                f"completed {ckpt.round} rounds already (run.rounds may only grow)"
            )
        self.server.load_state_dict(ckpt.server)
        self.cum_bytes = ckpt.cum_bytes
        truncate_to(self.metrics_path, ckpt.file_sizes["metrics.jsonl"])
        truncate_to(self.ledger.path, ckpt.file_sizes["ledger.jsonl"])
        self.recover_clients(ckpt.round)
        logger.info("resumed after round %d", ckpt.round)
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
        self.commit_clients(round_)

    # -- one round ----------------------------------------------------------------
    def _reject(self, round_: int, client: int, reason: str, rejected: dict[str, str]) -> None:
        rejected[str(client)] = reason
        logger.warning("round %d: client %d rejected: %s", round_, client, reason)

    def _seal_downlink(self, round_: int, client: int) -> bytes:
        """The method's body for ``client``, sealed; over ``runtime.max_payload_mb`` it
        is refused here, before anything is sent."""
        body = self.server.downlink(round_, client)
        if self._sealed is not None and self._sealed[0] is body:
            return self._sealed[1]  # sealed, and within the limit, for an earlier client
        payload = seal(self.cfg.method.name, round_, Direction.DOWN, body,
                       limit=self.setup.max_payload_bytes, what=f"downlink to client {client}")
        self._sealed = (body, payload)
        return payload

    def _open_uplink(self, round_: int, client: int, payload: bytes) -> ClientUpdate:
        """The server half's update from a sealed uplink; raises to reject the client."""
        body = open_envelope(payload, method=self.cfg.method.name, round_=round_,
                             direction=Direction.UP, limit=self.setup.max_payload_bytes,
                             what=f"client {client} uplink")
        return self.server.decode_uplink(round_, client, body)

    def _exchange_round(
        self, round_: int, clients: list[int], settle: Callable[[int, bytes | None, Reply], None]
    ) -> None:
        """Every downlink sealed first (the order rule), then the runtime's exchange; a
        client whose downlink could not be made is settled at once. The round's
        downlinks are dropped when this returns, before aggregation."""
        downlinks: dict[int, bytes] = {}
        try:
            for client in clients:
                try:
                    downlinks[client] = self._seal_downlink(round_, client)
                except Exception as e:  # a bad client never stops the round
                    settle(client, None, Reply(error=describe_error(e)))
        finally:
            self._sealed = None
        if downlinks:
            self.exchange(round_, downlinks, settle)

    def run_round(self, round_: int) -> dict[str, Any]:
        start = time.perf_counter()
        chosen = sample_clients(self.setup, round_)
        updates: list[ClientUpdate] = []
        rejected: dict[str, str] = {}
        client_stats: dict[str, dict[str, float]] = {}
        truncated = 0

        def settle(client: int, downlink: bytes | None, reply: Reply) -> None:
            nonlocal truncated
            truncated += reply.truncated
            if downlink is not None:
                self.ledger.record(round_, client, "down", downlink)
            if reply.uplink is None:
                self._reject(round_, client, reply.error, rejected)
                return
            self.ledger.record(round_, client, "up", reply.uplink)
            logger.debug("round %d: client %d: down %d B, up %d B%s", round_, client,
                         len(downlink or b""), len(reply.uplink),
                         "".join(f", {k} {v:.4g}" for k, v in reply.stats.items()))
            client_stats[str(client)] = reply.stats
            try:
                updates.append(self._open_uplink(round_, client, reply.uplink))
            except Exception as e:  # a bad client never stops the round
                self._reject(round_, client, describe_error(e), rejected)

        self._exchange_round(round_, chosen, settle)
        server_stats: dict[str, float] = {}
        if updates:
            server_stats = checked_stats(self.server.aggregate(round_, updates),
                                         f"method {self.cfg.method.name!r}: aggregate")
        else:
            logger.warning("round %d: no valid update; the global model is unchanged", round_)
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
            "truncated": truncated,
            "train_seconds": time.perf_counter() - start,
            # what a method measures inside its halves (e.g. FedKSeed's replay time),
            # each under its own key: nothing a method reports can replace a runtime key
            "client_stats": client_stats,
            "server_stats": server_stats,
            **self._privacy_spent(round_),
        }

    def _privacy_spent(self, round_: int) -> dict[str, float | None]:
        """``dp_epsilon`` and ``dp_delta`` after ``round_`` rounds, with ``[privacy]``;
        every round counts, whether or not its aggregate moved the model."""
        return self.accountant.row(round_) if self.accountant is not None else {}

    def evaluate(self) -> dict[str, float]:
        # a causal LM, or a PEFT model around one: evaluate calls it and generates with it
        model = cast(PreTrainedModel, self.server.global_model())
        return evaluate(
            model,
            self.setup.tokenizer,
            self.setup.eval_examples,
            self.setup.eval_items,
            self.cfg.eval,
            self.cfg.clients.max_length,
        )

    def _write_row(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        logger.info(_summary_line(row, self.cfg.run.rounds))

    # -- the loop -----------------------------------------------------------------
    def run(self, first_round: int = 0) -> None:
        """Run rounds ``first_round`` to ``run.rounds``; round 0 evaluates the initial model."""
        rounds = self.cfg.run.rounds
        if first_round == 0:
            start = time.perf_counter()
            row: dict[str, Any] = {
                "round": 0, "clients": [], "rejected": {}, "bytes_up": 0, "bytes_down": 0,
                "bytes_up_per_client": {}, "bytes_down_per_client": {}, "cum_bytes": 0,
                "train_loss": None, "eval_truncated": self.setup.eval_truncated,
                **self._privacy_spent(0), **self.evaluate(),
            }
            row.update(seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
            self._write_row(row)
            self._checkpoint(0)
            first_round = 1
        # every round logs its summary line; the bar is for a terminal only
        with progress("rounds", rounds, "rounds", logger=logger, lines=False,
                      initial=first_round - 1) as shown:
            for round_ in range(first_round, rounds + 1):
                start = time.perf_counter()
                row = self.run_round(round_)
                if round_ % self.cfg.eval.every == 0 or round_ == rounds:
                    row.update(self.evaluate())
                row.update(seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
                self._write_row(row)
                self._checkpoint(round_)
                shown.update()

    def raise_if_nothing_accepted(self) -> None:
        """Fail a run that trained rounds but never accepted a client update, naming why
        the updates were rejected (the model it saved is the initial one)."""
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
        trained = [r for r in rows if r["round"] > 0]
        if not trained or any(len(r["clients"]) > len(r["rejected"]) for r in trained):
            return
        reasons: dict[str, int] = {}
        for row in trained:
            for reason in row["rejected"].values():
                reasons[reason] = reasons.get(reason, 0) + 1
        listed = "; ".join(f"{reason} (x{n})" for reason, n in
                           sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        raise NoUpdateAccepted(
            f"no client update was accepted in {len(trained)} round"
            f"{'s' if len(trained) > 1 else ''}, so the model is "
            f"untrained; rejections: {listed or 'no client answered'} (see report.md)"
        )
