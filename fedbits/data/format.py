"""Turning examples into token ids with completion-only labels.

Instruction tuning trains on the response only: the loss on prompt tokens would mostly
teach the model to reproduce prompts, and with short answers it would drown the signal
that exact-match evaluation measures. So prompt tokens get the label -100 (ignored by
the loss) and only completion tokens (plus EOS, so the model learns to stop) are scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedbits.data.types import Example

IGNORE_INDEX = -100
FALLBACK_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True)
class Tokenized:
    """One training sequence: ``labels`` is -100 on prompt tokens, the token id on completion
    tokens; ``prompt_len`` counts the prompt tokens kept; ``truncated`` marks a cut sequence."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model expects it: its chat template when it has one (instruct
    models are tuned on it), else a plain Alpaca-style instruction/response frame."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # add_special_tokens=False: the template already carries its own special tokens.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = _encode(tokenizer, render_prompt(tokenizer, prompt))
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def _keep_end(ids: list[int], n: int, bos: int | None) -> list[int]:
    """The last ``n`` ids, keeping a leading BOS: the end of a prompt holds the question and
    the response marker, which matter more than its beginning."""
    if n >= len(ids):
        return ids
    if n <= 0:
        return []
    if bos is not None and ids[0] == bos:
        return [bos, *ids[len(ids) - n + 1 :]] if n > 1 else [bos]
    return ids[len(ids) - n :]


def tokenize_example(tokenizer: Any, ex: Example, max_length: int) -> Tokenized:
    """Prompt ids + completion ids + EOS, cut to ``max_length`` when too long.

    Over-long sequences lose the prompt's beginning first (down to half of ``max_length``)
    and then the completion's end, so what remains still pairs a question with the start
    of its answer.
    """
    prompt = _prompt_ids(tokenizer, ex.prompt)
    completion = _encode(tokenizer, ex.completion)
    if tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)
    truncated = len(prompt) + len(completion) > max_length
    if truncated:
        prompt_keep = min(len(prompt), max(max_length - len(completion), max_length // 2))
        prompt = _keep_end(prompt, prompt_keep, tokenizer.bos_token_id)
        completion = completion[: max_length - len(prompt)]
    return Tokenized(
        input_ids=prompt + completion,
        labels=[IGNORE_INDEX] * len(prompt) + completion,
        prompt_len=len(prompt),
        truncated=truncated,
    )


def tokenize_all(
    tokenizer: Any, examples: Sequence[Example], max_length: int
) -> tuple[list[Tokenized], int]:
    """All examples tokenised, and how many were truncated (reported, since silent
    truncation would hide that ``max_length`` is too small for the data)."""
    items = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    return items, sum(item.truncated for item in items)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Rendered prompt ids for generation, cut from the left to ``max_length``."""
    return [
        _keep_end(_prompt_ids(tokenizer, p), max_length, tokenizer.bos_token_id) for p in prompts
    ]
