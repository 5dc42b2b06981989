"""Everything a run needs before round 1: model, tokenizer, data, partitions.

Shared by every runtime, so the simulator and a real node see the same partitions
and the same base weights for the same config and seed. Who loads which data depends
on where it lives: the simulator loads ``data.source`` and partitions it
(:func:`prepare_run`); on Flower the server loads no client's data, only an evaluation
set of its own (:func:`prepare_server`), and each node brings its own training
examples (:func:`prepare_node`; :func:`shared_partition` is the one-machine demo, where
a node takes its partition of ``data.source`` as the simulator would).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fedbits.config import Config
from fedbits.data.examples import load_examples
from fedbits.data.format import Tokenized, tokenize_all
from fedbits.data.partition import load_eval_source, partition, split_eval, train_split
from fedbits.data.types import Example
from fedbits.errors import DataError, ModelError
from fedbits.frozen import Copied, FrozenBase, copy_all, resolve_device
from fedbits.methods import MethodContext, get_method
from fedbits.models import load_model
from fedbits.seeding import derive_seed

logger = logging.getLogger(__name__)


@dataclass
class RunSetup:
    cfg: Config
    tokenizer: Any
    frozen: FrozenBase  # the one pretrained base of this process
    clients: list[list[Example]]  # the simulator's partitions; [] where data is on the nodes
    eval_examples: list[Example]
    eval_items: list[Tokenized]
    eval_truncated: int
    eligible: list[int]  # the clients a round samples from

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def build_model(
        self, copied: Copied = copy_all, master_dtype: torch.dtype | None = torch.float32,
        take: bool = False,
    ) -> PreTrainedModel:
        """A half's model over the shared frozen base (:meth:`FrozenBase.build`)."""
        return self.frozen.build(copied, master_dtype, take)

    def release_base(self) -> None:
        """Every half of this process is built: drop the base if nothing aliases it."""
        if self.frozen.release():
            logger.info("every weight is trained by a half of its own: the frozen base is "
                        "released (pretrained values are read back from disk when needed)")

    @property
    def max_payload_bytes(self) -> int:
        """``runtime.max_payload_mb`` in bytes: the runtime refuses a sealed payload over it
        on both sides, before sending and before opening."""
        return int(self.cfg.runtime.max_payload_mb * 1_000_000)

    def method_context(self, last_half: bool = False) -> MethodContext:
        """What a half is built from. ``last_half``: no other half of this process is
        built after it, so a model copying the whole base may take the base's own
        tensors (it builds its model once)."""
        spec = get_method(self.cfg.method.name)
        return MethodContext(
            method=self.cfg.method.name,
            options=spec.options.model_validate(self.cfg.method.options()),
            seed=self.cfg.run.seed,
            clients=self.cfg.clients,
            cohort=self.cfg.clients_per_round(),
            model_name=self.cfg.model.name,
            tokenizer=self.tokenizer,
            build_model=partial(self.build_model, take=last_half),
            base_tensor=self.frozen.tensor,
            device=self.frozen.device,
            robust=self.cfg.robust,
            privacy=self.cfg.privacy,
            rounds=self.cfg.run.rounds,
        )

    def eligible_clients(self) -> list[int]:
        """The clients a round samples from: in the simulator those with at least one
        example (empty partitions are never sampled); on Flower every client slot, since
        the server does not see the nodes' data."""
        return list(self.eligible)

    def tokenize(self, examples: list[Example]) -> tuple[list[Tokenized], int]:
        return tokenize_all(self.tokenizer, examples, self.cfg.clients.max_length)


TRUNCATION_SAMPLE = 512
"""Training examples tokenised at start-up to measure how many ``max_length`` cuts."""
TRUNCATION_WARN = 0.1
"""Above this fraction of cut examples the run header warns (answers lose their end)."""


def _log_truncation(cfg: Config, tokenizer: Any, train: list[Example],
                    eval_truncated: int, n_eval: int) -> None:
    """The header's truncation line, and a warning when ``max_length`` cuts many examples."""
    rng = random.Random(derive_seed(cfg.run.seed, "truncation"))
    sample = train if len(train) <= TRUNCATION_SAMPLE else rng.sample(train, TRUNCATION_SAMPLE)
    _, cut = tokenize_all(tokenizer, sample, cfg.clients.max_length)
    of = f"{len(sample)}" if len(sample) == len(train) else f"a sample of {len(sample)}"
    logger.info(f"max_length {cfg.clients.max_length} cuts {cut} of {of} training examples "
                f"and {eval_truncated} of {n_eval} evaluated")
    worst = max(cut / max(len(sample), 1), eval_truncated / max(n_eval, 1))
    if worst > TRUNCATION_WARN:
        logger.warning(f"{worst:.0%} of examples are longer than clients.max_length="
                       f"{cfg.clients.max_length} and are cut (prompt start, then answer end); "
                       "raise clients.max_length if the model allows")


def deterministic_cuda() -> None:
    """One seed reproduces a run on the same kind of GPU, and a resumed run continues it
    bit for bit: cuBLAS and cuDNN are told to pick deterministic algorithms (cuBLAS
    reads its workspace setting when it starts, so it is set before any CUDA work)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _checkpoint_dir(model: PreTrainedModel) -> Path | None:
    """Where the model's weights lie on disk (a save_pretrained directory), if anywhere."""
    path = Path(str(getattr(model, "name_or_path", "") or ""))
    return path if str(path) and path.is_dir() else None


def _load_model(cfg: Config) -> tuple[PreTrainedModel, Any]:
    """The run's model on its device, in eval mode, and its tokenizer."""
    try:
        device = resolve_device(cfg.model.device)
    except RuntimeError as e:
        raise ModelError(str(e)) from None
    if device.type == "cuda":
        deterministic_cuda()
    model, tokenizer = load_model(cfg.model, seed=cfg.run.seed)
    model.eval()
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() for dtypes only
    logger.debug("model on %s in %s", device, cfg.model.dtype)
    return model, tokenizer


def _parameters(model: PreTrainedModel) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"


def prepare_run(cfg: Config) -> RunSetup:
    """The simulator's set-up: every client's partition of ``data.source`` and the
    held-out evaluation set, in this process."""
    model, tokenizer = _load_model(cfg)
    examples = load_examples(
        cfg.data.source,
        seed=cfg.run.seed,
        builtin_per_task=cfg.data.builtin_per_task,
        max_examples=cfg.data.max_examples,
    )
    train, held_out = split_eval(examples, cfg.data, cfg.run.seed)
    clients = partition(train, cfg.data, cfg.run.seed)
    eval_examples = held_out[: cfg.eval.max_examples]
    eval_items, truncated = tokenize_all(tokenizer, eval_examples, cfg.clients.max_length)
    sizes = [len(c) for c in clients]
    if not any(sizes):
        raise DataError(f"data {cfg.data.source}: no training examples are left after holding "
                        f"out {len(held_out)} for evaluation")
    logger.info(
        f"model {cfg.model.name}: {_parameters(model)} | data {cfg.data.source}: "
        f"{len(train)} train / {len(held_out)} held out ({len(eval_examples)} evaluated) | "
        f"{cfg.data.num_clients} clients ({cfg.data.partition}), sizes {min(sizes)}..{max(sizes)}, "
        f"{sizes.count(0)} empty"
    )
    _log_truncation(cfg, tokenizer, train, truncated, len(eval_items))
    if not eval_examples:
        logger.warning(f"no held-out examples ({len(examples)} examples in {cfg.data.source}): "
                       "no round is evaluated; add data or set data.eval_source")
    eligible = [i for i, size in enumerate(sizes) if size]
    if len(eligible) < cfg.clients_per_round():
        logger.warning(f"only {len(eligible)} of {cfg.data.num_clients} clients hold data, so a "
                       f"round samples {len(eligible)}, not {cfg.clients_per_round()}")
    frozen = FrozenBase(model, _checkpoint_dir(model))
    return RunSetup(cfg, tokenizer, frozen, clients, eval_examples, eval_items, truncated,
                    eligible)


def prepare_server(cfg: Config) -> RunSetup:
    """The Flower server's set-up: the model and an evaluation set of the server's own,
    ``data.eval_source`` (a file on the SuperLink host), and no client's data at all:
    ``data.source`` is never opened, since each node trains on data the server does not
    see. Every one of the ``data.num_clients`` client slots is eligible; a slot whose node
    has no data says so in its reply. Without ``data.eval_source`` no round is evaluated
    and the rounds report the nodes' training loss only."""
    model, tokenizer = _load_model(cfg)
    held_out = load_eval_source(cfg.data, cfg.run.seed) if cfg.data.eval_source else []
    eval_examples = held_out[: cfg.eval.max_examples]
    eval_items, truncated = tokenize_all(tokenizer, eval_examples, cfg.clients.max_length)
    evaluation = (f"evaluation {cfg.data.eval_source}: {len(held_out)} examples "
                  f"({len(eval_examples)} evaluated, {truncated} cut by max_length)"
                  if eval_examples else "no evaluation set")
    logger.info(f"model {cfg.model.name}: {_parameters(model)} | training data: each "
                f"SuperNode's own, {cfg.data.num_clients} client slots; this server loads "
                f"none of it | {evaluation}")
    if not eval_examples:
        logger.warning("the server has no evaluation set of its own: no round is evaluated "
                       "and rounds report the nodes' train_loss only; set data.eval_source to "
                       "a data file on the SuperLink host")
    frozen = FrozenBase(model, _checkpoint_dir(model))
    return RunSetup(cfg, tokenizer, frozen, [], eval_examples, eval_items, truncated,
                    list(range(cfg.data.num_clients)))


def prepare_node(cfg: Config) -> RunSetup:
    """A Flower node's set-up: the model only. The node brings its training examples
    (its own data, or :func:`shared_partition` in the demo) and evaluates nothing."""
    model, tokenizer = _load_model(cfg)
    return RunSetup(cfg, tokenizer, FrozenBase(model, _checkpoint_dir(model)), [], [], [], 0, [])


def shared_partition(cfg: Config, index: int) -> list[Example]:
    """Partition ``index`` of the run's ``data.source``, exactly as the simulator splits
    it (the held-out part is left out without loading ``data.eval_source``). This is the
    shared-source demo: every node loads the whole source, a path or spec the run names."""
    examples = load_examples(cfg.data.source, seed=cfg.run.seed,
                             builtin_per_task=cfg.data.builtin_per_task,
                             max_examples=cfg.data.max_examples)
    return partition(train_split(examples, cfg.data, cfg.run.seed), cfg.data, cfg.run.seed)[index]
