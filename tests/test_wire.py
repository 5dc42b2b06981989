"""The envelope and tensor codecs: exact round trips, strict rejection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbits.errors import WireError
from fedbits.wire import (
    Direction,
    Layout,
    Reader,
    Writer,
    header_size,
    open_envelope,
    read_tensors,
    seal,
    write_tensors,
)

LIMIT = 10_000_000


def _decode(payload: bytes, **kw):
    args = dict(method="fedit", round_=3, direction=Direction.UP, limit=LIMIT, what="payload")
    args.update(kw)
    return open_envelope(payload, **args)


def _seal(body: bytes) -> bytes:
    return seal("fedit", 3, Direction.UP, body, limit=LIMIT, what="client 3 uplink")


def test_envelope_round_trip_and_fixed_header():
    body = b"hello world"
    payload = _seal(body)
    assert _decode(payload) == body
    assert len(payload) == header_size("fedit") + len(body)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="fedavg"), "method 'fedit', expected 'fedavg'"),
        (dict(round_=4), "round 3, expected 4"),
        (dict(direction=Direction.DOWN), "direction"),
        (dict(limit=10), "exceeds the limit"),
    ],
)
def test_envelope_rejects_wrong_fields(kw, match):
    payload = _seal(b"x" * 100)
    with pytest.raises(WireError, match=match):
        _decode(payload, **kw)


def test_seal_refuses_a_payload_over_the_limit_naming_it():
    limit = header_size("fedit") + 99
    assert len(seal("fedit", 1, Direction.DOWN, b"x" * 99, limit=limit, what="w")) == limit
    with pytest.raises(WireError, match=f"^downlink to client 3: {limit + 1} bytes exceeds the "
                                        f"limit of {limit}$"):
        seal("fedit", 1, Direction.DOWN, b"x" * 100, limit=limit, what="downlink to client 3")


def test_envelope_rejects_truncation_garbage_version_and_bitflips():
    payload = _seal(bytes(range(200)))
    for cut in (0, 1, 5, len(payload) // 2, len(payload) - 1):
        with pytest.raises(WireError):
            _decode(payload[:cut])
    with pytest.raises(WireError, match="length"):
        _decode(payload + b"\0")
    bad_version = payload[:2] + bytes([99]) + payload[3:]
    with pytest.raises(WireError, match="version 99"):
        _decode(bad_version)
    with pytest.raises(WireError, match="magic"):
        _decode(b"XX" + payload[2:])
    for i in range(len(payload)):
        flipped = bytearray(payload)
        flipped[i] ^= 0x10
        with pytest.raises(WireError):
            _decode(bytes(flipped))


def test_reader_refuses_to_allocate_past_the_payload():
    w = Writer().u8(1).u64(10**12)  # declares a trillion float32 values
    with pytest.raises(WireError, match="only 0 bytes remain"):
        Reader(w.getvalue()).tensor("delta")


_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64])


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=4),
    dtype=_dtypes,
    seed=st.integers(0, 2**31),
)
def test_tensor_sets_round_trip_exactly(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"layer{i}.weight": (torch.randn(*s, generator=g) * 50).to(dtype)
        for i, s in enumerate(shapes)
    }
    layout = Layout.of(tensors)
    w = Writer()
    write_tensors(w, layout, tensors, dtype)
    r = Reader(w.getvalue())
    out = read_tensors(r, layout, dtype)
    r.finish()
    assert list(out) == list(tensors)
    for name in tensors:
        assert out[name].dtype == dtype
        assert torch.equal(out[name], tensors[name])
    element_size = tensors[next(iter(tensors))].element_size()
    assert len(w.getvalue()) == 8 + 1 + 8 + layout.numel * element_size


def test_layout_mismatch_is_rejected():
    a = {"w": torch.zeros(2, 3)}
    b = {"w": torch.zeros(3, 2)}
    w = Writer()
    write_tensors(w, Layout.of(a), a, torch.float32)
    with pytest.raises(WireError, match="fingerprint"):
        read_tensors(Reader(w.getvalue()), Layout.of(b), torch.float32)
    with pytest.raises(WireError, match="dtype"):
        read_tensors(Reader(w.getvalue()), Layout.of(a), torch.float16)
