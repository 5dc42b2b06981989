"""Loading instruction data from files, folders, saved and hub datasets into :class:`Example`.

Every source ends up as one flat list of :class:`Example` so that splitting, partitioning
and tokenising never care where the text came from. Loading is strict on purpose: a
federated run can take hours, so a bad line should stop it at load time with the file
and line named, not as a shape error in round three.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets

from fedbits.data.builtin import generate_builtin_tasks
from fedbits.data.types import Example
from fedbits.errors import DataError
from fedbits.progress import progress

logger = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
SCHEMAS = (
    "alpaca (instruction, input, output)",
    "dolly (instruction, context, response, category)",
    "prompt/completion (prompt, completion)",
    "gsm8k (question, answer)",
)
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def load_examples(
    source: str,
    *,
    seed: int = 0,
    builtin_per_task: int = 200,
    max_examples: int | None = None,
) -> list[Example]:
    """Load ``source`` into examples, optionally keeping a seeded subset of ``max_examples``.

    ``source`` is a ``.json``/``.jsonl`` file (optionally ``.gz``), a folder of such files
    (one file = one task), a ``save_to_disk`` dataset directory, ``hf:<name>[:<split>]``
    or ``builtin:tasks``.
    """
    examples = _load_source(source, seed=seed, builtin_per_task=builtin_per_task)
    if not examples:
        raise DataError(f"data source {source!r} holds no examples")
    if max_examples is not None and max_examples < len(examples):
        # Sorted indices keep the source order, so a subset of a folder stays grouped.
        keep = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in keep]
    return examples


def _load_source(source: str, *, seed: int, builtin_per_task: int) -> list[Example]:
    if source.startswith("builtin:"):
        return _load_builtin(source.removeprefix("builtin:"), seed, builtin_per_task)
    if source.startswith("hf:"):
        return _load_hub(source.removeprefix("hf:"))
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source not found: {path}")
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            return _load_saved_dataset(path)
        return _load_folder(path)
    return _load_file(path, task=None)


def _load_builtin(name: str, seed: int, per_task: int) -> list[Example]:
    if name != "tasks":
        raise DataError(f"unknown builtin data set {name!r} (available: builtin:tasks)")
    return generate_builtin_tasks(per_task, seed)


def _load_hub(spec: str) -> list[Example]:
    name, _, split = spec.partition(":")
    if not name:
        raise DataError("hf: source needs a dataset name, e.g. hf:databricks/databricks-dolly-15k")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, missing dataset, bad split: all user-fixable
        raise DataError(
            f"cannot load hub dataset {name!r} (split {split or 'train'!r}): {e}"
        ) from e
    return _from_records(ds, where=lambda i: f"hf:{name} row {i}", task=None)


def _load_saved_dataset(path: Path) -> list[Example]:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # a corrupt or partial save_to_disk directory
        raise DataError(f"cannot load saved dataset {path}: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(
                f"{path}: saved DatasetDict has no 'train' split (has {sorted(loaded)})"
            )
        loaded = loaded["train"]
    return _from_records(loaded, where=lambda i: f"{path} row {i}", task=None)


def _load_folder(path: Path) -> list[Example]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(SUFFIXES)}) in folder")
    examples: list[Example] = []
    # a folder of hundreds of task files takes a while
    with progress(f"loading {path.name}", len(files), "files", logger=logger) as shown:
        for file in files:
            examples.extend(_load_file(file, task=_task_name(file)))
            shown.update()
    return examples


def _task_name(file: Path) -> str:
    """``foo.jsonl.gz`` -> ``foo``: the file stem without any of the data suffixes."""
    name = file.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _load_file(path: Path, task: str | None) -> list[Example]:
    if not path.name.endswith(SUFFIXES):
        raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    is_array = path.name.endswith((".json", ".json.gz")) and text.lstrip().startswith("[")
    if is_array:
        examples = _from_records(
            _json_array(path, text), where=lambda i: f"{path} index {i}", task=task
        )
    else:
        examples = _from_jsonl(path, text, task)
    if not examples:
        raise DataError(f"{path}: no records in file")
    return examples


def _read_text(path: Path) -> str:
    # utf-8-sig: a leading byte-order mark (as some editors write) is accepted and dropped.
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8-sig") as f:
                return f.read()
        return path.read_text(encoding="utf-8-sig")
    except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated .gz
        raise DataError(f"{path}: cannot read file: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None


def _json_array(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def _from_jsonl(path: Path, text: str, task: str | None) -> list[Example]:
    examples = []
    # Only "\n" ends a JSONL line: str.splitlines() would also break at U+2028, U+2029 and
    # U+0085, which are legal inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: invalid JSON: {e.msg}") from None
        examples.append(_to_example(record, f"{path} line {lineno}", task))
    return examples


def _from_records(
    records: Iterable[Any], where: Callable[[int], str], task: str | None
) -> list[Example]:
    return [_to_example(record, where(i), task) for i, record in enumerate(records)]


def _to_example(record: Any, where: str, task: str | None) -> Example:
    """Detect the record's schema and map it; ``task`` (a folder's file stem) wins over fields."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if {"instruction", "output"} <= keys:
        prompt = _join(_text(record, "instruction", where), _text(record, "input", where, ""))
        return _example(record, where, task, prompt, _text(record, "output", where), None)
    if {"instruction", "response"} <= keys:
        prompt = _join(_text(record, "instruction", where), _text(record, "context", where, ""))
        return _example(record, where, task, prompt, _text(record, "response", where), None)
    if {"prompt", "completion"} <= keys:
        answer = _text(record, "answer", where, "") if record.get("answer") is not None else None
        return _example(
            record,
            where,
            task,
            _text(record, "prompt", where),
            _text(record, "completion", where),
            answer,
        )
    if {"question", "answer"} <= keys:
        completion = _text(record, "answer", where)
        return _example(
            record,
            where,
            task,
            _text(record, "question", where),
            completion,
            _final_answer(completion),
        )
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise DataError(
        f"{where}: record fits no known schema; keys found: {found}; "
        f"expected one of: {'; '.join(SCHEMAS)}"
    )


def _example(
    record: Mapping[str, Any],
    where: str,
    task: str | None,
    prompt: str,
    completion: str,
    answer: str | None,
) -> Example:
    if task is None:
        task = _text(record, "task", where, "") or _text(record, "category", where, "")
    return Example(prompt=prompt, completion=completion, task=task, answer=answer)


def _text(record: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    """A field as text; numbers are accepted (answers are often stored as numbers)."""
    value = record.get(key)
    if value is None:
        if default is None:
            raise DataError(f"{where}: field {key!r} is missing or null")
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    return str(value)


def _join(instruction: str, context: str) -> str:
    return f"{instruction}\n\n{context}" if context.strip() else instruction


def _final_answer(answer: str) -> str:
    """GSM8K's final number after ``####`` (thousands commas removed); the whole text, stripped,
    for question/answer data without that marker, whose answers are already short."""
    if "####" not in answer:
        return answer.strip()
    return answer.rsplit("####", 1)[1].strip().replace(",", "")
