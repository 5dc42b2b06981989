"""Zeroth-order step time against a forward pass, side by side in one process.

On ``smollm2-135m`` (CPU, float32) with batch 1 × 128 tokens of ``builtin:tasks``
examples packed into one sequence (labels on the completions only, as in training):

* ``forward``: the plain inference forward a user would time, ``model(**batch)``
  with labels (all 128 logits);
* ``forward_loss_only``: the same forward computing logits only where a label is
  (what the ZO step computes per half), for an apples-to-apples view;
* ``zo_step``: one :meth:`ZeroOrderTrainer.step` (both perturbed losses, the update).

Runs are interleaved (forward, step, forward, step, ...) so drift in machine speed
hits both alike; medians are reported. Writes ``bench/results/zo_step.json``.

    python bench/zo_step.py [--repeats 10] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fedbits.config import ModelSection
from fedbits.data.examples import load_examples
from fedbits.data.format import tokenize_example
from fedbits.models import load_model
from fedbits.zo.step import ZeroOrderTrainer

RESULTS = Path(__file__).resolve().parent / "results"


def packed_batch(tokenizer, length: int = 128) -> dict[str, torch.Tensor]:
    """Real examples back to back until ``length`` tokens: 1 × length, labels on completions."""
    ids: list[int] = []
    labels: list[int] = []
    for example in load_examples("builtin:tasks", seed=0, builtin_per_task=20):
        item = tokenize_example(tokenizer, example, length)
        ids += item.input_ids
        labels += item.labels
        if len(ids) >= length:
            break
    return {
        "input_ids": torch.tensor([ids[:length]]),
        "attention_mask": torch.ones(1, length, dtype=torch.long),
        "labels": torch.tensor([labels[:length]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    model, tokenizer = load_model(ModelSection(name=args.model), seed=0)
    model.eval()
    batch = packed_batch(tokenizer)
    keep = (batch["labels"][:, 1:] != -100).any(0).nonzero().squeeze(1)
    trainer = ZeroOrderTrainer(model, eps=5e-4, lr=3e-7, weight_decay=0.0)

    def forward() -> None:
        with torch.no_grad():
            model(**batch)

    def forward_loss_only() -> None:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  logits_to_keep=keep)

    times: dict[str, list[float]] = {"forward": [], "forward_loss_only": [], "zo_step": []}
    with trainer.attached():
        step = iter(range(10**9))

        def zo_step() -> None:
            trainer.step(next(step), batch)

        for i in range(args.repeats + 2):  # two warm-up rounds
            for name, fn in (("forward", forward), ("zo_step", zo_step),
                             ("forward_loss_only", forward_loss_only)):
                start = time.perf_counter()
                fn()
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model,
        "batch": "1 x 128 tokens, builtin:tasks packed, labels on completions",
        "label_tokens": int((batch["labels"] != -100).sum()),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "seconds_median": med,
        "seconds_all": times,
        "zo_step_over_forward": med["zo_step"] / med["forward"],
        "zo_step_over_forward_loss_only": med["zo_step"] / med["forward_loss_only"],
        "target": "zo_step_over_forward <= 2.3",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zo_step.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds_all"}, indent=2))


if __name__ == "__main__":
    main()
