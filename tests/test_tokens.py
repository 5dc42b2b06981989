"""The simulator tokenises each client's data once and trains on exactly the same items."""

from __future__ import annotations

import pytest

from fedbits.data.builtin import generate_builtin_tasks
from fedbits.data.format import Tokenized, tokenize_all
from fedbits.data.types import Example
from fedbits.models import build_byte_tokenizer
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime import simulation as simulation_module
from fedbits.runtime.tokens import TokenCache

from conftest import TINY, assert_same_final_and_ledger


def _counting(tokenize):
    calls: list[int] = []

    def counted(examples):
        calls.append(len(examples))
        return tokenize(examples)

    return counted, calls


def test_each_client_is_tokenised_once():
    clients = [[Example(prompt=f"p{c}", completion="c", task="t", answer="c")] * (c + 1)
               for c in range(3)]
    tokenize, calls = _counting(lambda exs: ([Tokenized([1, 2], [-100, 2], 1, False)
                                              for _ in exs], 0))
    cache = TokenCache(tokenize, clients)
    for _ in range(4):
        for client in (2, 0, 2):
            items, _ = cache.get(client)
            assert len(items) == client + 1
    assert calls == [3, 1]
    assert cache.tokenized == 2


@pytest.mark.parametrize("max_length", [8, 24, 256])
def test_cached_items_equal_tokenising_again(max_length):
    """Cut and uncut examples, through a real tokenizer: same items, same cut count."""
    tokenizer = build_byte_tokenizer()
    examples = generate_builtin_tasks(3, seed=0)
    clients = [examples[i::4] for i in range(4)] + [[]]

    def tokenize(exs):
        return tokenize_all(tokenizer, exs, max_length)

    cache = TokenCache(tokenize, clients)
    for _ in range(2):
        for client, part in enumerate(clients):
            assert cache.get(client) == tokenize(part)


def test_large_and_negative_ids_survive_and_each_get_is_a_fresh_copy():
    item = Tokenized([2**31 - 1, 70_000, 5], [-100, 70_000, 5], 1, True)
    cache = TokenCache(lambda exs: ([item, Tokenized([], [], 0, False)], 1), [[]])
    items, truncated = cache.get(0)
    assert items == [item, Tokenized([], [], 0, False)] and truncated == 1
    assert all(type(v) is int for v in items[0].input_ids + items[0].labels)
    items[0].input_ids.append(9)  # a method changing its lists leaves the cache alone
    assert cache.get(0)[0][0] == item


def test_an_id_outside_int32_is_refused_not_wrapped():
    cache = TokenCache(lambda exs: ([Tokenized([2**31], [2**31], 0, False)], 0), [[]])
    with pytest.raises(OverflowError):
        cache.get(0)


def test_a_run_with_the_cache_and_the_memory_store_equals_todays_run(tmp_path, monkeypatch,
                                                                      one_thread):
    """flasc with error feedback, clients sampled again: the default run (tokenised once,
    store in memory) and one that tokenises every round with the disk-only store end
    with the same weights after the same messages."""
    overrides = [f"run.out_dir={tmp_path}", "run.rounds=4", "method.name=flasc",
                 "method.error_feedback=true", "eval.every=4", "eval.metrics=['loss']"]
    cached = run_experiment(load_config(TINY, overrides + ["run.name=cached"]))

    class Retokenise(TokenCache):
        def get(self, client):
            return self._tokenize(self._clients[client])

    monkeypatch.setattr(simulation_module, "TokenCache", Retokenise)
    again = run_experiment(load_config(TINY, overrides + ["run.name=again",
                                                          "runtime.client_state_mb=0"]))
    assert_same_final_and_ledger(cached, again)
    assert any((again / "client_store" / "committed").iterdir())  # error feedback was kept
