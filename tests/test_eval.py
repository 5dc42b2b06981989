"""Evaluation: metrics on known strings, loss against a manual computation, generation."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from fedbits.config import EvalSection, ModelSection
from fedbits.data.examples import Example
from fedbits.data.format import IGNORE_INDEX, Tokenized, tokenize_all
from fedbits.eval import evaluate
from fedbits.eval.generate import greedy_generate
from fedbits.eval.loss import eval_loss
from fedbits.eval.metrics import (
    exact_match,
    extract_final_number,
    is_exact_match,
    normalize_text,
    rouge_l,
)
from fedbits.models import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelSection(name="tiny-llama"), seed=0)


# ------------------------------------------------------------------------------ metrics


def test_rouge_l_known_values() -> None:
    # LCS 3 of 3 predicted / 6 reference tokens: P=1, R=1/2, F=2/3.
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    assert rouge_l(["Same words"], ["same words"]) == pytest.approx(100.0)
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    assert rouge_l(["the cat sat", "x"], ["the cat sat on the mat", "x"]) == pytest.approx(250 / 3)


def test_exact_match_normalises_text() -> None:
    assert normalize_text('  "Hello,   World!" ') == "hello, world"
    assert is_exact_match("Cat Van.", "cat van")
    assert is_exact_match("'leaf'", "leaf")
    assert not is_exact_match("leaf pen", "leaf")
    assert not is_exact_match("", "leaf")
    got = exact_match(["Cat Van.", "13 20 44", "no"], ["cat van", "13 20 44", "yes"])
    assert got == pytest.approx(200 / 3)


@pytest.mark.parametrize(
    ("prediction", "number"),
    [
        ("Janet has 3 ducks... so she makes 18 dollars.\n#### 18", 18.0),
        ("#### 1,234 and then 7 more", 1234.0),
        ("The answer is 42.", 42.0),
        ("10 + 5 = 15", 15.0),
        ("53-21 = 32", 32.0),
        ("it drops to -4", -4.0),
        ("costs 2.50 each", 2.5),
        ("5,19", 19.0),
        ("no digits here", None),
        ("#### none, but 9 before", 9.0),
    ],
)
def test_gsm8k_final_number_extraction(prediction: str, number: float | None) -> None:
    assert extract_final_number(prediction) == number


def test_numeric_answers_compare_by_value() -> None:
    assert is_exact_match("The answer is 1,000.", "1000")
    assert is_exact_match("#### 72", "72")
    assert is_exact_match("3.0", "3")
    assert not is_exact_match("The answer is 41", "42")
    assert not is_exact_match("42 then 43", "42")  # the last number counts
    assert exact_match(["89", "x = 156", "31"], ["89", "156", "32"]) == pytest.approx(200 / 3)


def test_metrics_reject_mismatched_or_empty_inputs() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        exact_match([], [])


# --------------------------------------------------------------------------------- loss


def _item(prompt: list[int], completion: list[int]) -> Tokenized:
    return Tokenized(
        input_ids=prompt + completion,
        labels=[IGNORE_INDEX] * len(prompt) + completion,
        prompt_len=len(prompt),
        truncated=False,
    )


def _manual_loss(model: torch.nn.Module, items: list[Tokenized]) -> tuple[float, int]:
    """Per-sequence, unpadded: sum of -log p(completion token | prefix) over all items."""
    total, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            logits = model(torch.tensor([item.input_ids])).logits[0]
            for t in range(item.prompt_len, len(item.input_ids)):
                logp = F.log_softmax(logits[t - 1].double(), dim=-1)
                total -= logp[item.input_ids[t]].item()
                count += 1
    return total / count, count


def test_eval_loss_equals_manual_cross_entropy(tiny) -> None:
    model, tok = tiny
    items = [
        _item([1, 50, 60, 70], [80, 90, 2]),
        _item([1, 44], [45, 46, 47, 48, 2]),
        _item([1, 10, 11, 12, 13, 14, 15], [16, 2]),
    ]
    model.eval()
    expected, count = _manual_loss(model, items)
    model.train()
    for batch_size in (1, 2, 3):
        out = eval_loss(model, items, batch_size=batch_size, pad_id=tok.pad_token_id)
        assert out["eval_tokens"] == count == 10
        assert out["eval_loss"] == pytest.approx(expected, abs=1e-5)
        assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert model.training  # mode restored
    first = eval_loss(model, items, 2, tok.pad_token_id)
    assert first == eval_loss(model, items, 2, tok.pad_token_id)


def test_eval_loss_without_scored_tokens_is_nan(tiny) -> None:
    model, tok = tiny
    out = eval_loss(model, [_item([1, 5, 6], [])], 4, tok.pad_token_id)
    assert out["eval_tokens"] == 0 and math.isnan(out["eval_loss"])


# --------------------------------------------------------------------------- generation


def test_generation_is_bounded_and_deterministic(tiny) -> None:
    model, tok = tiny
    prompts = ["Add 2 and 3.", "A much longer prompt, so the batch needs left padding.", "x"]
    first = greedy_generate(model, tok, prompts, max_length=64, max_new_tokens=6, batch_size=2)
    again = greedy_generate(model, tok, prompts, max_length=64, max_new_tokens=6, batch_size=2)
    assert first == again and len(first) == 3
    # one byte token decodes to at most one character
    assert all(isinstance(t, str) and len(t) <= 6 for t in first)
    alone = [
        greedy_generate(model, tok, [p], max_length=64, max_new_tokens=6, batch_size=1)[0]
        for p in prompts
    ]
    assert alone == first  # left padding does not change a row's greedy output


def test_generation_decodes_only_new_tokens_up_to_eos(tiny, monkeypatch) -> None:
    model, tok = tiny
    calls = []

    def fake_generate(input_ids, attention_mask, **kwargs):
        calls.append(kwargs)
        new = torch.tensor([tok.encode("ok") + [tok.eos_token_id] + tok.encode("junk")])
        return torch.cat([input_ids, new.expand(input_ids.size(0), -1)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    out = greedy_generate(model, tok, ["p1", "prompt 2"], max_length=32, max_new_tokens=7,
                          batch_size=8)
    assert out == ["ok", "ok"]
    assert calls[0]["do_sample"] is False and calls[0]["max_new_tokens"] == 7
    assert calls[0]["pad_token_id"] == tok.pad_token_id


# ----------------------------------------------------------------------------- evaluate


EXAMPLES = [
    Example(prompt="Add 2 and 3.", completion="5", task="add", answer="5"),
    Example(prompt="Uppercase: cat", completion="CAT", task="uppercase", answer="CAT"),
    Example(prompt="Write a poem.", completion="roses are red", task="poem", answer=None),
    Example(prompt="Add 4 and 4.", completion="8", task="add", answer="8"),
]


def test_evaluate_runs_requested_metrics(tiny) -> None:
    model, tok = tiny
    items, _ = tokenize_all(tok, EXAMPLES, 64)
    section = EvalSection(metrics=["loss", "rougeL", "exact_match"], max_new_tokens=4, batch_size=3)
    out = evaluate(model, tok, EXAMPLES, items, section, max_length=64)
    assert set(out) == {"eval_loss", "perplexity", "eval_tokens", "rougeL", "exact_match"}
    want_loss = eval_loss(model, items, 3, tok.pad_token_id)["eval_loss"]
    assert out["eval_loss"] == pytest.approx(want_loss)
    predictions = greedy_generate(model, tok, [ex.prompt for ex in EXAMPLES], max_length=64,
                                  max_new_tokens=4, batch_size=3)
    assert out["rougeL"] == rouge_l(predictions, [ex.completion for ex in EXAMPLES])
    answered = [(p, ex.answer) for p, ex in zip(predictions, EXAMPLES, strict=True)
                if ex.answer is not None]
    assert out["exact_match"] == 100 * sum(is_exact_match(p, a) for p, a in answered) / 3
    assert out == evaluate(model, tok, EXAMPLES, items, section, max_length=64)


def _rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokens: lowercase ASCII letters and digits, nothing else."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _hand_rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 from a longest common subsequence computed here, not by rouge-score."""
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    lcs = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(r):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
    common = lcs[len(p)][len(r)]
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def test_evaluate_rouge_l_equals_a_hand_computed_value(tiny) -> None:
    """References built from the random model's own greedy outputs (one exact, one sharing
    two words, one unrelated, one reversed), so the score is neither 0 nor 100 and pairs
    each prediction with its own reference."""
    model, tok = tiny
    prompts = [ex.prompt for ex in EXAMPLES]
    predictions = greedy_generate(model, tok, prompts, max_length=64, max_new_tokens=24,
                                  batch_size=3)
    references = [predictions[0], " ".join(_rouge_tokens(predictions[1])[:2]) + " plus words",
                  "zzzz qqqq", " ".join(reversed(_rouge_tokens(predictions[3])))]
    examples = [Example(p, ref, "t", None) for p, ref in zip(prompts, references, strict=True)]
    items, _ = tokenize_all(tok, examples, 64)
    section = EvalSection(metrics=["rougeL"], max_new_tokens=24, batch_size=3)
    got = evaluate(model, tok, examples, items, section, max_length=64)["rougeL"]
    want = 100 * sum(map(_hand_rouge_l, predictions, references)) / len(examples)
    assert 0 < want < 100
    assert got == pytest.approx(want, abs=1e-9)


def test_evaluate_caps_examples_and_skips_unmeasurable(tiny) -> None:
    model, tok = tiny
    items, _ = tokenize_all(tok, EXAMPLES, 64)
    section = EvalSection(metrics=["loss", "exact_match"], max_examples=1, max_new_tokens=2)
    out = evaluate(model, tok, EXAMPLES, items, section, max_length=64)
    assert out["eval_tokens"] == eval_loss(model, items[:1], 8, tok.pad_token_id)["eval_tokens"]
    assert set(out) == {"eval_loss", "perplexity", "eval_tokens", "exact_match"}
    poem = EXAMPLES[2:3]
    only_free_form = evaluate(
        model, tok, poem, tokenize_all(tok, poem, 64)[0], EvalSection(metrics=["exact_match"]), 64
    )
    assert only_free_form == {}


def test_evaluate_rejects_misaligned_inputs(tiny) -> None:
    model, tok = tiny
    items, _ = tokenize_all(tok, EXAMPLES, 64)
    with pytest.raises(ValueError, match="4 examples but 3"):
        evaluate(model, tok, EXAMPLES, items[:3], EvalSection(), max_length=64)
