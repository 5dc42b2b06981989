"""Every decoder fuzzed on every test run, at a small N: bench/fuzz.py's harness.

The bench (10,000 payloads per kind and layer, bench/results/fuzz.json) holds the
figures; here the same random, truncated and bit-flipped payloads, fewer of them,
keep a new method, stage or decoder change from crashing on one. Then the
regressions the fuzzer found, each on the payload that crashed it.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest

from fedbits.errors import WireError
from fedbits.methods import ClientData, get_method
from fedbits.methods.fedkseed import protocol
from fedbits.methods.fedkseed.client import POOL_KEY
from fedbits.methods.fedkseed.wire import EntryFormat, encode_entries
from fedbits.resolve import load_config
from fedbits.runtime.setup import RunSetup
from fedbits.wire import Reader, Writer

from conftest import TINY, load_bench

fuzz = load_bench("fuzz")
METHOD_N = 25  # per kind and layer: 150 payloads each way; an accepted downlink trains
CHAIN_N = 100  # decoding a chain payload takes tens of microseconds


@pytest.fixture(scope="module")
def setup(one_thread) -> RunSetup:
    return fuzz.base_setup()


def _no_failures(result: dict, n: int) -> None:
    assert result["failures"] == 0, result["failure_examples"]
    assert result["payloads"] == len(fuzz.KINDS) * len(fuzz.LAYERS) * n


@pytest.mark.parametrize("label,options", [
    pytest.param(label, options, id=label) for label, options in fuzz.method_configs()
    if not label.startswith("test-")])  # the suite's own methods misbehave on purpose
def test_method_decoders_answer_any_bytes_with_a_documented_error(setup, label, options):
    """Both sides of every registered method (the registry's, plugins included) and its
    wire variants: nothing but WireError or ClientError, whatever arrives."""
    for target in fuzz.method_targets(setup, label, options):
        _no_failures(fuzz.fuzz(target, METHOD_N, seed=0), METHOD_N)


@pytest.mark.parametrize("stages,vector", [
    pytest.param(stages, vector, id=f"{'+'.join(stages)}-{vector}")
    for stages, vector in fuzz.chain_cases()])
def test_chain_decoders_answer_any_bytes_with_a_documented_error(one_thread, stages, vector):
    _no_failures(fuzz.fuzz(fuzz.chain_target(stages, vector), CHAIN_N, seed=0), CHAIN_N)


def test_the_fuzzer_counts_a_crash_and_an_allocation_as_failures():
    """The harness itself: a decoder that raises something undocumented, or maps
    gigabytes for a few bytes, fails; a documented refusal does not."""
    def decode(payload: bytes) -> None:
        if payload[:1] == b"\x00":
            raise IndexError("crash")
        if payload[:1] == b"\x01":
            np.empty(1 << 36, np.uint8)  # 64 GB: refused (MemoryError) or mapped, untouched
        raise WireError("refused")

    target = fuzz.Target("probe", b"\x02abc", b"\x02abc", lambda body: body, decode)
    memory = fuzz.peak_memory()
    crash = fuzz.attempt(target, b"\x00", memory).verdict()
    assert isinstance(crash, IndexError)
    assert isinstance(fuzz.attempt(target, b"\x02", memory).verdict(), WireError)
    if memory.available:
        assert isinstance(fuzz.attempt(target, b"\x01", memory).verdict(), MemoryError)


# ---------------------------------------------------------------- regressions


def _fedkseed_client(setup: RunSetup, name: str):
    cfg = load_config(TINY, [*fuzz.SETUP_OVERRIDES, f"method.name={name}"])
    return get_method(name).client(dataclasses.replace(setup, cfg=cfg).method_context())


def test_fedkseed_client_refuses_a_pool_it_cannot_replay_exactly(setup):
    """Were OverflowErrors from the replay (random and bit-flipped downlink bodies): a
    pool scalar beyond fixed point, or a change from the pool the client last replayed
    too large to accumulate exactly. Now WireErrors naming the field, and the store
    keeps the last pool the client could replay."""
    client = _fedkseed_client(setup, "fedkseed")
    k, fmt = client.opts.num_seeds, client.opts.pool_format()
    items, _ = setup.tokenize(setup.clients[setup.eligible_clients()[0]])
    data, store = ClientData(items, setup.pad_id, 0), fuzz.MemoryStore()

    def downlink(full: bool, value: float) -> bytes:
        return protocol.encode_downlink(full, np.array([5]), np.array([value]), fmt, k, None)

    with pytest.raises(WireError, match="downlink to client 3: field entries.values: .*too "
                                        "large for exact replay"):
        client.update(1, 3, downlink(True, 2.0**50), data, store)
    assert not store
    held = np.zeros(k)
    held[5] = 2.0**23  # replayable from zero; moving to -2^23 is twice that change
    client.sync(held)
    store.put(POOL_KEY, held.astype("<f8").tobytes())
    with pytest.raises(WireError, match="downlink to client 3: field entries.values: .*too "
                                        "large to accumulate exactly"):
        client.update(2, 3, downlink(False, -(2.0**23)), data, store)
    assert store[POOL_KEY] == held.astype("<f8").tobytes()


def test_fedkseed_pro_importance_declaring_gigabytes_is_refused_before_allocating():
    """Was MemoryError (a zstd frame declaring 64 GB of importance levels, which
    zstandard allocated up front): now refused from the frame header."""
    fmt = EntryFormat("compact")
    w = Writer().u8(1)
    encode_entries(w, np.zeros(0, np.int64), np.zeros(0), 64, fmt, unique=True)
    frame = bytes.fromhex("28b52ffd") + bytes([0xE0]) + struct.pack("<Q", 1 << 36) + b"\1\0\0"
    w.u8(1).blob(frame)
    with pytest.raises(WireError, match="downlink to client 0: field importance: declared size"):
        protocol.decode_downlink(Reader(w.getvalue(), "downlink to client 0"), fmt, 64, pro=True)
