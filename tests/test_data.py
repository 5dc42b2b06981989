"""fedbits.data: loading, builtin tasks, eval splits, partitions, tokenising, batching.

Everything here runs offline on files written to tmp_path and a byte-level tokenizer
built in memory; the real shared data is exercised in test_data_sources.py.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fedbits.config import DataSection
from fedbits.data import (
    Example,
    Tokenized,
    collate,
    describe_partitions,
    generate_builtin_tasks,
    iterate_batches,
    left_pad,
    load_examples,
    partition,
    render_prompt,
    split_eval,
    tokenize_all,
    tokenize_example,
    tokenize_prompts,
)
from fedbits.data import examples as examples_module
from fedbits.data.partition import load_eval_source, train_split
from fedbits.errors import DataError


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _examples(tasks: dict[str, int]) -> list[Example]:
    return [
        Example(f"{t} prompt {i}", f"{t} out {i}", t, None)
        for t, n in tasks.items()
        for i in range(n)
    ]


# ---------------------------------------------------------------- loading: schemas


def test_alpaca_json_array_joins_instruction_and_input(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
                {"instruction": "Say hi.", "input": "", "output": "hi"},
            ]
        )
    )
    exs = load_examples(str(path))
    assert exs == [
        Example(prompt="Translate.\n\nbonjour", completion="hello", task="", answer=None),
        Example(prompt="Say hi.", completion="hi", task="", answer=None),
    ]


def test_dolly_jsonl_uses_context_and_category(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {
                "instruction": "Who?",
                "context": "Ada wrote it.",
                "response": "Ada",
                "category": "closed_qa",
            },
            {
                "instruction": "Write a poem.",
                "context": "",
                "response": "Roses",
                "category": "creative_writing",
            },
        ],
    )
    exs = load_examples(str(path))
    assert [(e.prompt, e.completion, e.task) for e in exs] == [
        ("Who?\n\nAda wrote it.", "Ada", "closed_qa"),
        ("Write a poem.", "Roses", "creative_writing"),
    ]


def test_prompt_completion_gz_keeps_task_and_answer_fields(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "pc.jsonl.gz",
        [
            {"prompt": "2+2?", "completion": "4", "task": "math", "answer": "4"},
            {"prompt": "Name a colour.", "completion": "red"},
        ],
    )
    assert load_examples(str(path)) == [
        Example("2+2?", "4", "math", "4"),
        Example("Name a colour.", "red", "", None),
    ]


def test_gsm8k_answer_is_the_final_number(tmp_path: Path) -> None:
    worked = "She has 1000 + 234 = <<1000+234=1234>>1234 eggs.\n#### 1,234"
    path = _write_jsonl(
        tmp_path / "gsm.json.gz",  # a .json file holding JSON lines is read as JSON lines
        [{"question": "How many eggs?", "answer": worked}, {"question": "Q?", "answer": "#### -7"}],
    )
    exs = load_examples(str(path))
    assert exs[0] == Example("How many eggs?", worked, "", "1234")
    assert exs[1].answer == "-7"


def test_folder_one_task_per_file_in_name_order(tmp_path: Path) -> None:
    _write_jsonl(
        tmp_path / "b_task.jsonl.gz", [{"prompt": "p", "completion": "c", "task": "ignored"}]
    )
    _write_jsonl(
        tmp_path / "a_task.jsonl",
        [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}],
    )
    (tmp_path / "c_task.json").write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    (tmp_path / "README.md").write_text("not data")
    exs = load_examples(str(tmp_path))
    assert [e.task for e in exs] == ["a_task", "a_task", "b_task", "c_task"]
    assert [e.prompt for e in exs] == ["p1", "p2", "p", "i"]


def test_save_to_disk_dataset_and_datasetdict(tmp_path: Path) -> None:
    rows = {
        "instruction": ["a", "b"],
        "context": ["", "ctx"],
        "response": ["A", "B"],
        "category": ["x", "y"],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    exs = load_examples(str(tmp_path / "ds"))
    assert [(e.prompt, e.completion, e.task) for e in exs] == [
        ("a", "A", "x"),
        ("b\n\nctx", "B", "y"),
    ]

    test_rows = {"question": ["q"], "answer": ["w #### 5"]}
    train_rows = {"question": ["q1", "q2"], "answer": ["#### 1", "#### 2"]}
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(train_rows),
            "test": datasets.Dataset.from_dict(test_rows),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    assert [e.answer for e in load_examples(str(tmp_path / "dd"))] == ["1", "2"]


def test_hub_source_passes_name_and_split_and_wraps_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def fake_load(name: str, split: str) -> list[dict]:
        calls.append((name, split))
        if name == "org/broken":
            raise ConnectionError("offline")
        return [{"prompt": "p", "completion": "c"}]

    monkeypatch.setattr(examples_module.datasets, "load_dataset", fake_load)
    assert load_examples("hf:org/good:test[:10]") == [Example("p", "c", "", None)]
    load_examples("hf:org/good")
    assert calls == [("org/good", "test[:10]"), ("org/good", "train")]
    with pytest.raises(DataError, match=r"org/broken.*offline"):
        load_examples("hf:org/broken")


# ---------------------------------------------------------------- loading: errors


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: invalid JSON"):
        load_examples(str(path))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_unknown_schema_names_keys_and_expected_schemas(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "odd.jsonl", [{"prompt": "p", "completion": "c"}, {"text": "x", "label": 1}]
    )
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    msg = str(err.value)
    assert "odd.jsonl line 2" in msg and "label, text" in msg
    assert "alpaca" in msg and "gsm8k" in msg and "prompt/completion" in msg


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.jsonl", "", "file is empty"),
        ("blank.jsonl", "\n\n", "file is empty"),
        ("empty_array.json", "[]", "no records"),
        (
            "object.json",
            '{"prompt": "p"}',
            "line 1",
        ),  # not an array: read as JSON lines, then no schema
        ("scalar.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("nulls.jsonl", '{"prompt": null, "completion": "c"}\n', "'prompt' is missing or null"),
        ("broken.json", '[{"prompt": "p",', "invalid JSON at line 1"),
        ("data.csv", "a,b\n", "unsupported file type"),
    ],
)
def test_bad_files_raise_data_error(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_examples(str(path))


def test_empty_folder_and_unknown_builtin(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no data files"):
        load_examples(str(tmp_path))
    with pytest.raises(DataError, match="builtin:tasks"):
        load_examples("builtin:nope")


def test_max_examples_is_a_seeded_ordered_subset() -> None:
    full = load_examples("builtin:tasks", builtin_per_task=20, seed=1)
    a = load_examples("builtin:tasks", builtin_per_task=20, max_examples=30, seed=1)
    assert len(a) == 30
    assert a == load_examples("builtin:tasks", builtin_per_task=20, max_examples=30, seed=1)
    assert a != load_examples("builtin:tasks", builtin_per_task=20, max_examples=30, seed=2)
    positions = [full.index(e) for e in a]
    assert positions == sorted(positions)


# ---------------------------------------------------------------- builtin tasks


def _check_builtin_answer(ex: Example) -> None:
    """Recompute each family's answer from its prompt, so a wrong generator fails."""
    nums = [int(n) for n in re.findall(r"\d+", ex.prompt)]
    words = ex.prompt.split(": ", 1)[-1].split()
    expected = {
        "add": lambda: str(nums[0] + nums[1]),
        "subtract": lambda: str(nums[1] - nums[0]),
        "multiply": lambda: str(nums[0] * nums[1]),
        "largest": lambda: str(max(nums)),
        "smallest": lambda: str(min(nums)),
        "sort": lambda: " ".join(map(str, sorted(nums))),
        "count_numbers": lambda: str(len(nums)),
        "reverse_words": lambda: " ".join(reversed(words)),
        "uppercase": lambda: " ".join(words).upper(),
        "first_word": lambda: words[0],
        "last_word": lambda: words[-1],
        "count_letter": lambda: str(ex.prompt.split()[-1].rstrip(".").count(ex.prompt.split()[3])),
    }[ex.task]()
    assert ex.completion == expected, ex
    assert ex.answer == ex.completion


def test_builtin_tasks_deterministic_correct_and_short() -> None:
    exs = generate_builtin_tasks(per_task=50, seed=3)
    assert exs == generate_builtin_tasks(per_task=50, seed=3)
    assert exs != generate_builtin_tasks(per_task=50, seed=4)
    counts = Counter(e.task for e in exs)
    assert len(counts) >= 8 and set(counts.values()) == {50}
    for ex in exs:
        _check_builtin_answer(ex)
        assert len(ex.prompt) <= 60 and len(ex.completion) <= 30
    # Distinct prompts per family, so a held-out fraction is not a copy of training data.
    assert all(len({e.prompt for e in exs if e.task == t}) == 50 for t in counts)
    assert load_examples("builtin:tasks", builtin_per_task=50, seed=3) == exs


def test_builtin_small_families_still_fill_per_task() -> None:
    exs = generate_builtin_tasks(
        per_task=400, seed=0
    )  # more than count_letter has distinct prompts
    assert set(Counter(e.task for e in exs).values()) == {400}


# ---------------------------------------------------------------- eval split


def test_eval_fraction_is_seeded_and_disjoint() -> None:
    exs = _examples({"a": 30, "b": 70})
    data = DataSection(eval_fraction=0.2)
    train, held = split_eval(exs, data, seed=0)
    assert (len(train), len(held)) == (80, 20)
    assert Counter(train + held) == Counter(exs)
    assert split_eval(exs, data, seed=0) == (train, held)
    assert split_eval(exs, data, seed=1)[1] != held
    assert split_eval(exs[:1], data, seed=0) == (exs[:1], [])


def test_eval_unseen_holds_out_whole_tasks() -> None:
    exs = _examples({f"t{i}": 5 + i for i in range(10)})
    train, held = split_eval(exs, DataSection(eval_split="unseen", eval_fraction=0.3), seed=0)
    held_tasks, train_tasks = {e.task for e in held}, {e.task for e in train}
    assert len(held_tasks) == 3 and not held_tasks & train_tasks
    assert len(train) + len(held) == len(exs)

    data = DataSection(eval_split="unseen", eval_values=["t1", "t4"])
    train, held = split_eval(exs, data, seed=0)
    assert {e.task for e in held} == {"t1", "t4"} and len(held) == 6 + 9
    with pytest.raises(DataError, match="t99"):
        split_eval(exs, DataSection(eval_split="unseen", eval_values=["t99"]), seed=0)
    with pytest.raises(DataError, match="at least 2"):
        split_eval(_examples({"only": 5}), DataSection(eval_split="unseen"), seed=0)


def test_eval_source_is_used_whole(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "eval.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(7)]
    )
    exs = _examples({"a": 10})
    train, held = split_eval(exs, DataSection(eval_source=str(path)), seed=0)
    assert train == exs and sorted(e.prompt for e in held) == [f"p{i}" for i in range(7)]


@pytest.mark.parametrize("eval_source", [False, True])
def test_the_two_sides_of_the_split_load_apart(tmp_path: Path, eval_source: bool) -> None:
    """A Flower node takes the training side without loading ``data.eval_source`` (a path
    on the server's host), the server the evaluation source without the training data;
    together they are ``split_eval``."""
    path = _write_jsonl(
        tmp_path / "eval.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(9)]
    )
    exs = _examples({"a": 10, "b": 12})
    data = DataSection(eval_source=str(path) if eval_source else None)
    train, held = split_eval(exs, data, seed=3)
    assert train_split(exs, data, seed=3) == train
    if eval_source:
        assert load_eval_source(data, seed=3) == held
        path.unlink()  # the training side never reads it
        assert train_split(exs, data, seed=3) == exs
    else:
        with pytest.raises(DataError, match="data.eval_source is not set"):
            load_eval_source(data, seed=3)


@pytest.mark.parametrize("split", ["fraction", "unseen"])
def test_eval_order_is_shuffled_so_a_prefix_spans_tasks(split: str) -> None:
    exs = generate_builtin_tasks(per_task=50, seed=0)  # grouped by task, 12 tasks
    data = DataSection(eval_split=split, eval_fraction=0.25)
    train, held = split_eval(exs, data, seed=0)
    assert train == [e for e in exs if e in set(train)]  # train keeps the source order
    assert len({e.task for e in held[:30]}) >= 3
    assert split_eval(exs, data, seed=0)[1] == held


# ---------------------------------------------------------------- partitions


def test_iid_partition_is_balanced_complete_and_seeded() -> None:
    exs = _examples({"a": 50, "b": 53})
    data = DataSection(partition="iid", num_clients=4)
    parts = partition(exs, data, seed=0)
    assert len(parts) == 4 and sorted(map(len, parts)) == [25, 26, 26, 26]
    assert Counter(e for p in parts for e in p) == Counter(exs)
    assert partition(exs, data, seed=0) == parts
    assert partition(exs, data, seed=1) != parts
    assert {e.task for e in parts[0]} == {"a", "b"}  # shuffled, not contiguous shards


def test_dirichlet_partition_skewed_complete_and_seeded() -> None:
    exs = _examples({f"t{i}": 40 for i in range(6)})
    data = DataSection(partition="dirichlet", num_clients=5, alpha=0.1)
    parts = partition(exs, data, seed=0)
    assert len(parts) == 5 and Counter(e for p in parts for e in p) == Counter(exs)
    assert partition(exs, data, seed=0) == parts
    assert partition(exs, data, seed=1) != parts

    def empty_cells(parts: list[list[Example]]) -> int:
        return sum(not any(e.task == t for e in p) for t in {e.task for e in exs} for p in parts)

    # alpha=0.1 concentrates each task on few clients, leaving many (task, client) pairs
    # empty; iid spreads 40 examples of each task over all 5 clients.
    assert empty_cells(parts) >= 9
    assert empty_cells(partition(exs, DataSection(partition="iid", num_clients=5), seed=0)) == 0


@pytest.mark.parametrize("n", [0, 1, 3])
def test_dirichlet_and_iid_cope_with_fewer_examples_than_clients(n: int) -> None:
    exs = _examples({"a": n})
    for kind in ("iid", "dirichlet"):
        parts = partition(exs, DataSection(partition=kind, num_clients=10, alpha=0.05), seed=0)
        assert len(parts) == 10 and sum(map(len, parts)) == n


def test_natural_partition_one_task_per_client() -> None:
    exs = _examples({"x": 3, "y": 1, "z": 7})
    parts = partition(exs, DataSection(partition="natural", num_clients=3), seed=0)
    assert [({e.task for e in p}, len(p)) for p in parts] == [({"x"}, 3), ({"y"}, 1), ({"z"}, 7)]
    with pytest.raises(DataError, match="has 3"):
        partition(exs, DataSection(partition="natural", num_clients=5), seed=0)


def test_partition_by_unknown_column_lists_allowed() -> None:
    with pytest.raises(DataError, match="allowed: task, answer"):
        partition(_examples({"a": 3}), DataSection(partition_by="label"), seed=0)


def test_partition_by_answer_with_missing_answers() -> None:
    exs = [Example("p", "c", "t", a) for a in ("1", "2", None, "1")]
    parts = partition(
        exs, DataSection(partition="natural", partition_by="answer", num_clients=3), seed=0
    )
    assert [len(p) for p in parts] == [1, 2, 1]  # "" (none) sorts first, then "1", "2"


def test_describe_partitions() -> None:
    parts = [_examples({"a": 2, "b": 1}), []]
    assert describe_partitions(parts) == [
        {"client": 0, "size": 3, "tasks": 2, "largest": "a (2), b (1)"},
        {"client": 1, "size": 0, "tasks": 0, "largest": ""},
    ]


# ---------------------------------------------------------------- tokenising


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level tokenizer (one token per byte) with pad/bos/eos, built offline."""
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def test_labels_cover_completion_and_eos_only(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = byte_tokenizer
    item = tokenize_example(tok, Example("Add 2 and 3.", "5 apples", "add", "5"), max_length=256)
    rendered = "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert render_prompt(tok, "Add 2 and 3.") == rendered
    assert item.prompt_len == 1 + len(rendered.encode())  # BOS added, one token per byte
    assert item.input_ids[0] == tok.bos_token_id
    assert item.labels[: item.prompt_len] == [-100] * item.prompt_len
    scored = item.labels[item.prompt_len :]
    assert scored == item.input_ids[item.prompt_len :]
    assert scored[-1] == tok.eos_token_id and tok.decode(scored[:-1]) == "5 apples"
    assert not item.truncated
    assert tok.decode(item.input_ids[1 : item.prompt_len]) == rendered


def test_chat_template_is_used_without_a_second_bos(
    byte_tokenizer: PreTrainedTokenizerFast,
) -> None:
    tok = byte_tokenizer
    tok.chat_template = (
        "<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    try:
        assert render_prompt(tok, "hi") == "<s>[user] hi\n[assistant] "
        item = tokenize_example(tok, Example("hi", "yo", "", None), max_length=64)
        assert item.input_ids.count(tok.bos_token_id) == 1 and item.input_ids[0] == tok.bos_token_id
        assert tokenize_prompts(tok, ["hi"], max_length=64) == [item.input_ids[: item.prompt_len]]
    finally:
        tok.chat_template = None


def test_long_prompt_is_cut_from_the_left_keeping_bos(
    byte_tokenizer: PreTrainedTokenizerFast,
) -> None:
    tok = byte_tokenizer
    item = tokenize_example(tok, Example("x" * 300 + " END", "42", "", "42"), max_length=64)
    assert item.truncated and len(item.input_ids) == 64 and len(item.labels) == 64
    assert item.input_ids[0] == tok.bos_token_id
    assert tok.decode(item.labels[item.prompt_len :]) == "42</s>"  # the completion survives whole
    assert tok.decode(item.input_ids[1 : item.prompt_len]).endswith("END\n\n### Response:\n")


def test_long_completion_keeps_its_start_and_half_the_prompt(
    byte_tokenizer: PreTrainedTokenizerFast,
) -> None:
    tok = byte_tokenizer
    item = tokenize_example(
        tok, Example("Tell a story.", "once upon a time " * 20, "", None), max_length=64
    )
    assert item.truncated and len(item.input_ids) == 64
    assert item.prompt_len == 32
    completion = tok.decode(item.labels[item.prompt_len :])
    assert completion == ("once upon a time " * 20)[:32]


def test_tokenize_all_counts_truncated(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    exs = [
        Example("short", "a", "", None),
        Example("y" * 500, "b", "", None),
        Example("z" * 90, "c", "", None),
    ]
    items, n_truncated = tokenize_all(byte_tokenizer, exs, max_length=100)
    assert n_truncated == 2 and [i.truncated for i in items] == [False, True, True]
    assert all(len(i.input_ids) <= 100 for i in items)


def test_tokenize_prompts_cut_from_the_left(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = byte_tokenizer
    short, long = tokenize_prompts(tok, ["Hi.", "w" * 200], max_length=40)
    assert tok.decode(short) == "<s>### Instruction:\nHi.\n\n### Response:\n"
    assert len(long) == 40 and long[0] == tok.bos_token_id
    assert tok.decode(long).endswith("www\n\n### Response:\n")


# ---------------------------------------------------------------- batching


def _items(lengths: list[int]) -> list[Tokenized]:
    return [
        Tokenized(
            input_ids=list(range(10, 10 + n)),
            labels=[-100, *range(11, 10 + n)],
            prompt_len=1,
            truncated=False,
        )
        for n in lengths
    ]


def test_collate_right_pads_with_masked_labels() -> None:
    batch = collate(_items([3, 1]), pad_id=0)
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert batch["input_ids"].tolist() == [[10, 11, 12], [10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 11, 12], [-100, -100, -100]]


def test_iterate_batches_exact_steps_seeded_and_balanced() -> None:
    items = _items([2, 3, 4, 5, 6])

    def run(seed: int, steps: int, batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
        return list(
            iterate_batches(items, batch_size, steps, torch.Generator().manual_seed(seed), pad_id=0)
        )

    batches = run(0, steps=10)
    assert len(batches) == 10 and all(b["input_ids"].shape[0] == 2 for b in batches)
    again = run(0, steps=10)
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True)
    )
    other = run(1, steps=10)
    assert any(
        not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other, strict=True)
    )
    # 10 batches x 2 = 4 full epochs of 5 items: every item seen exactly 4 times.
    seen = Counter(int(row.sum()) for b in batches for row in b["attention_mask"])
    assert seen == Counter({n: 4 for n in [2, 3, 4, 5, 6]})
    assert [b["input_ids"].shape[0] for b in run(0, steps=3, batch_size=8)] == [5, 5, 5]
    assert run(0, steps=0) == []
    assert list(iterate_batches([], 4, 5, torch.Generator().manual_seed(0), pad_id=0)) == []


def test_left_pad_aligns_last_tokens() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and ids.dtype == torch.int64
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
