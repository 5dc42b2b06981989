"""Client stores commit with the round's checkpoint, so a crash never leaks state."""

from __future__ import annotations

import pytest

from fedbits.runtime.store import ClientStores


def test_pending_writes_are_visible_then_committed(tmp_path):
    stores = ClientStores(tmp_path)
    s = stores.for_client(3, round_=1)
    assert s.get("residual") is None
    s.put("residual", b"r1")
    assert s.get("residual") == b"r1"
    assert stores.for_client(3, round_=2).get("residual") is None  # not committed yet
    stores.commit(1)
    assert stores.for_client(3, round_=2).get("residual") == b"r1"
    assert not (tmp_path / "pending").exists() or not any((tmp_path / "pending").iterdir())


def test_recover_finishes_the_checkpointed_round_and_drops_later_ones(tmp_path):
    stores = ClientStores(tmp_path)
    stores.for_client(0, 1).put("k", b"round1")   # checkpoint of round 1 written, crash
    stores.for_client(0, 2).put("k", b"round2")   # before commit; round 2 half done
    stores.recover(last_completed_round=1)
    assert stores.for_client(0, 2).get("k") == b"round1"


def test_keys_are_checked(tmp_path):
    with pytest.raises(ValueError, match="must match"):
        ClientStores(tmp_path).for_client(0, 1).put("../escape", b"x")


# -- the memory layer -------------------------------------------------------------------


def test_reads_are_answered_from_memory_within_the_budget(tmp_path):
    stores = ClientStores(tmp_path, budget_bytes=1000)
    stores.for_client(0, 1).put("k", b"x" * 100)
    stores.commit(1)
    reads = stores.counters.disk_reads
    assert stores.for_client(0, 2).get("k") == b"x" * 100
    assert stores.counters.disk_reads == reads  # no look at the disk at all
    assert stores.counters.hits == 1
    assert stores.memory_bytes() == 100


def test_the_budget_is_never_exceeded_and_the_least_recently_used_spills(tmp_path):
    stores = ClientStores(tmp_path, budget_bytes=250)
    for client in range(3):
        stores.for_client(client, 1).put("k", bytes([client]) * 100)
        assert stores.memory_bytes() <= 250
    assert stores.counters.spills == 1  # client 0, the oldest, went
    assert stores.memory_entries() == 2
    stores.commit(1)
    stores.for_client(1, 2).get("k")  # client 1 is now the most recently used
    stores.for_client(0, 2).get("k")  # read back from disk: client 2 spills, not 1
    assert stores.memory_bytes() <= 250
    hits = stores.counters.hits
    assert stores.for_client(1, 2).get("k") == bytes([1]) * 100
    assert stores.counters.hits == hits + 1
    assert stores.counters.spills == 2


def test_reads_after_spills_equal_the_writes(tmp_path):
    stores = ClientStores(tmp_path, budget_bytes=300)
    values = {c: bytes([c]) * (50 + 10 * c) for c in range(20)}
    for round_ in (1, 2):
        for c, v in values.items():
            store = stores.for_client(c, round_)
            assert store.get("k") == (v if round_ == 2 else None)
            store.put("k", v)
            assert store.get("k") == v
            assert stores.memory_bytes() <= 300
        stores.commit(round_)
    assert stores.counters.spills > 0
    assert all(stores.for_client(c, 3).get("k") == v for c, v in values.items())


def test_a_value_over_the_budget_is_kept_on_disk_only(tmp_path):
    stores = ClientStores(tmp_path, budget_bytes=10)
    stores.for_client(0, 1).put("big", b"y" * 11)
    stores.for_client(0, 1).put("empty", b"")
    assert stores.memory_bytes() == 0 and stores.memory_entries() == 0
    assert stores.for_client(0, 1).get("big") == b"y" * 11
    assert stores.for_client(0, 1).get("empty") == b""
    stores.commit(1)
    assert stores.for_client(0, 2).get("big") == b"y" * 11


def test_a_commit_replaces_the_committed_value_in_memory(tmp_path):
    stores = ClientStores(tmp_path, budget_bytes=1000)
    stores.for_client(0, 1).put("k", b"old")
    stores.commit(1)
    assert stores.for_client(0, 2).get("k") == b"old"
    stores.for_client(0, 2).put("k", b"new")
    assert stores.for_client(0, 2).get("k") == b"new"
    assert stores.for_client(0, 3).get("k") == b"old"  # round 2 is not committed yet
    stores.commit(2)
    assert stores.for_client(0, 3).get("k") == b"new"
    assert stores.memory_bytes() == 3  # one value per key once committed


def test_a_committed_value_spilled_while_its_next_write_stayed_is_not_stale(tmp_path):
    stores = ClientStores(tmp_path, budget_bytes=10)
    stores.for_client(0, 1).put("k", b"old")
    stores.commit(1)
    stores.for_client(0, 2).get("k")
    stores.for_client(0, 2).put("k", b"newer-val")  # 3 + 9 > 10: the old value spills
    stores.commit(2)
    assert stores.for_client(0, 3).get("k") == b"newer-val"


@pytest.mark.parametrize("budget", [0, 150, 10_000])
def test_a_crash_after_the_checkpoint_recovers_every_write_of_the_round(tmp_path, budget):
    """The round's checkpoint is written, then the process dies before commit: one value
    spilled from memory (only on disk) and one still in memory both come back."""
    stores = ClientStores(tmp_path, budget_bytes=budget)
    stores.for_client(0, 1).put("k", b"a" * 100)
    stores.for_client(1, 1).put("k", b"b" * 100)  # with budget 150, client 0's value spills
    stores.for_client(2, 1).put("k", b"c" * 100)
    stores.commit(1)
    stores.for_client(0, 2).put("k", b"A" * 100)
    stores.for_client(1, 2).put("k", b"B" * 100)
    if budget == 150:
        assert stores.counters.spills > 0 and stores.memory_bytes() <= 150
    del stores  # crash: memory is gone, checkpoint of round 2 was written

    resumed = ClientStores(tmp_path, budget_bytes=budget)
    resumed.recover(last_completed_round=2)
    assert resumed.for_client(0, 3).get("k") == b"A" * 100
    assert resumed.for_client(1, 3).get("k") == b"B" * 100
    assert resumed.for_client(2, 3).get("k") == b"c" * 100


@pytest.mark.parametrize("budget", [0, 150, 10_000])
def test_a_crash_before_the_checkpoint_drops_the_round(tmp_path, budget):
    stores = ClientStores(tmp_path, budget_bytes=budget)
    stores.for_client(0, 1).put("k", b"a" * 100)
    stores.commit(1)
    stores.for_client(0, 2).put("k", b"A" * 100)
    stores.for_client(1, 2).put("k", b"B" * 100)
    del stores  # crash during round 2: its checkpoint was never written

    resumed = ClientStores(tmp_path, budget_bytes=budget)
    resumed.recover(last_completed_round=1)
    assert resumed.for_client(0, 2).get("k") == b"a" * 100
    assert resumed.for_client(1, 2).get("k") is None


def test_recover_in_the_same_process_forgets_later_writes_in_memory(tmp_path):
    """A Flower node settles in the process that wrote: a round the server cut short
    must not be seen, not even from memory."""
    stores = ClientStores(tmp_path, budget_bytes=1000)
    stores.for_client(0, 1).put("k", b"one")
    stores.for_client(0, 2).put("k", b"two")
    stores.recover(last_completed_round=1)
    assert stores.for_client(0, 2).get("k") == b"one"
    assert stores.memory_bytes() == 3


def test_pending_writes_left_by_another_process_are_read_before_recovery(tmp_path):
    ClientStores(tmp_path, budget_bytes=1000).for_client(0, 1).put("k", b"left")
    assert ClientStores(tmp_path, budget_bytes=1000).for_client(0, 1).get("k") == b"left"


def test_budget_zero_is_the_disk_store(tmp_path):
    stores = ClientStores(tmp_path, budget_bytes=0)
    stores.for_client(0, 1).put("k", b"v")
    assert (tmp_path / "pending" / "1" / "0" / "k").read_bytes() == b"v"
    stores.commit(1)
    assert (tmp_path / "committed" / "0" / "k").read_bytes() == b"v"
    assert stores.for_client(0, 2).get("k") == b"v"
    assert stores.memory_entries() == 0 and stores.counters.hits == 0
    assert stores.counters.spills == 0


def test_writes_reach_the_disk_at_once_whatever_the_budget(tmp_path):
    """The round's writes must be on disk before its checkpoint is."""
    stores = ClientStores(tmp_path, budget_bytes=10_000)
    stores.for_client(4, 7).put("k", b"v")
    assert (tmp_path / "pending" / "7" / "4" / "k").read_bytes() == b"v"


@pytest.mark.parametrize("key", ["../escape", "a/b", "", ".tmp/x", "x" * 101, "a\\b", "é"])
@pytest.mark.parametrize("budget", [0, 1000])
def test_hostile_keys_are_refused_on_read_and_write(tmp_path, key, budget):
    store = ClientStores(tmp_path, budget_bytes=budget).for_client(0, 1)
    with pytest.raises(ValueError, match="must match"):
        store.put(key, b"x")
    with pytest.raises(ValueError, match="must match"):
        store.get(key)
    assert not (tmp_path / "escape").exists()


def test_a_negative_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        ClientStores(tmp_path, budget_bytes=-1)
