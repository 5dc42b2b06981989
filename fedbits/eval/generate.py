"""Greedy batched generation for the generation metrics (ROUGE-L, exact match).

Prompts are left-padded so every row's last prompt token sits in the same column and the
new tokens line up; greedy decoding makes the evaluation repeatable run to run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from fedbits.data.batching import left_pad
from fedbits.data.format import tokenize_prompts
from fedbits.eval.common import inference, model_device


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's eos plus any the model's generation config adds (chat models often
    stop on an end-of-turn token as well)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def _cut_at_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def _generate_batch(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    pad_id: int,
    stop_ids: list[int],
    max_new_tokens: int,
) -> list[list[int]]:
    device = model_device(model)
    input_ids, attention_mask = left_pad(prompt_ids, pad_id)
    # a causal LM mixes GenerationMixin in (PreTrainedModel itself does not since
    # transformers 4.50; a PeftModel forwards generate to its base model)
    out = cast(GenerationMixin, model).generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stop_ids,
        use_cache=True,
    )
    new_tokens = out[:, input_ids.size(1) :].tolist()
    return [_cut_at_stop(row, stop_ids) for row in new_tokens]


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[], None] | None = None,
) -> list[str]:
    """The greedy completion of each prompt (rendered like training prompts, cut from the
    left to ``max_length`` tokens), at most ``max_new_tokens`` tokens, stopped at eos."""
    all_ids = tokenize_prompts(tokenizer, prompts, max_length)
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    texts: list[str] = []
    with inference(model):
        for start in range(0, len(all_ids), batch_size):
            batch = _generate_batch(
                model, all_ids[start : start + batch_size], pad_id, stop_ids, max_new_tokens
            )
            texts.extend(t.strip() for t in tokenizer.batch_decode(batch, skip_special_tokens=True))
            if on_batch is not None:
                on_batch()
    return texts
