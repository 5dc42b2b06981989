"""Data for federated instruction tuning: load examples, hold out evaluation data,
partition across clients, tokenise with completion-only labels, and batch."""

from fedbits.data.batching import collate, iterate_batches, left_pad
from fedbits.data.builtin import generate_builtin_tasks
from fedbits.data.examples import load_examples
from fedbits.data.format import (
    Tokenized,
    render_prompt,
    tokenize_all,
    tokenize_example,
    tokenize_prompts,
)
from fedbits.data.partition import describe_partitions, partition, split_eval
from fedbits.data.types import Example

__all__ = [
    "Example",
    "Tokenized",
    "collate",
    "describe_partitions",
    "generate_builtin_tasks",
    "iterate_batches",
    "left_pad",
    "load_examples",
    "partition",
    "render_prompt",
    "split_eval",
    "tokenize_all",
    "tokenize_example",
    "tokenize_prompts",
]
