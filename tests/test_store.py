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
