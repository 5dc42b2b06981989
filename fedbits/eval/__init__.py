"""Evaluation of the global model on held-out data: loss, ROUGE-L and exact match.

:func:`evaluate` runs what ``[eval] metrics`` asks for on the first ``max_examples``
held-out examples and returns one flat dict of floats, ready to log. Generation is the
expensive part, so it runs once and feeds both ROUGE-L and exact match.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbits.config import EvalSection
from fedbits.data.format import Tokenized
from fedbits.data.types import Example
from fedbits.eval.generate import greedy_generate
from fedbits.eval.loss import eval_loss
from fedbits.eval.metrics import exact_match, rouge_l
from fedbits.progress import progress

__all__ = ["eval_loss", "evaluate", "exact_match", "greedy_generate", "rouge_l"]

logger = logging.getLogger(__name__)


def _batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def _to_generate(examples: Sequence[Example], metrics: Sequence[str]) -> list[Example]:
    """ROUGE-L scores every example; exact match only those with a short answer, so when
    ROUGE-L is off only those are generated."""
    if "rougeL" in metrics:
        return list(examples)
    if "exact_match" in metrics:
        return [ex for ex in examples if ex.answer is not None]
    return []


def _generation_metrics(
    examples: list[Example], predictions: list[str], metrics: Sequence[str]
) -> dict[str, float]:
    """ROUGE-L against the completions, exact match against the answers. ``exact_match``
    is left out when no example has an answer (free-form data has nothing to match)."""
    out: dict[str, float] = {}
    if "rougeL" in metrics and examples:
        out["rougeL"] = rouge_l(predictions, [ex.completion for ex in examples])
    answered = [(p, ex.answer) for p, ex in zip(predictions, examples, strict=True)
                if ex.answer is not None]
    if "exact_match" in metrics and answered:
        preds, answers = zip(*answered, strict=True)
        out["exact_match"] = exact_match(preds, answers)
    return out


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    tokenized: list[Tokenized],
    section: EvalSection,
    max_length: int,
) -> dict[str, float]:
    """Run ``section.metrics`` on the first ``section.max_examples`` examples.

    ``tokenized[i]`` must be ``examples[i]`` tokenised (for the loss); prompts for
    generation are cut to ``max_length`` tokens. Returns e.g. ``{"eval_loss", "perplexity",
    "eval_tokens", "rougeL", "exact_match"}``; the model's train/eval mode is preserved.
    """
    if len(examples) != len(tokenized):
        raise ValueError(f"{len(examples)} examples but {len(tokenized)} tokenized items")
    examples = examples[: section.max_examples]
    tokenized = tokenized[: section.max_examples]
    use_loss = "loss" in section.metrics
    to_generate = _to_generate(examples, section.metrics)
    total = _batches(len(tokenized), section.batch_size) * use_loss
    total += _batches(len(to_generate), section.batch_size)
    results: dict[str, float] = {}
    with progress("evaluating", total, "batches", logger=logger) as bar:
        if use_loss and tokenized:
            results.update(
                eval_loss(model, tokenized, section.batch_size, tokenizer.pad_token_id, bar.update)
            )
        if to_generate:
            predictions = greedy_generate(
                model,
                tokenizer,
                [ex.prompt for ex in to_generate],
                max_length=max_length,
                max_new_tokens=section.max_new_tokens,
                batch_size=section.batch_size,
                on_batch=bar.update,
            )
            results.update(_generation_metrics(to_generate, predictions, section.metrics))
    return results
