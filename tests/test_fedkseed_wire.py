"""FedKSeed entries on the wire: exact round trips, smallest representation, strict decoding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbits.errors import WireError
from fedbits.methods.fedkseed.wire import (
    EntryFormat,
    decode_entries,
    encode_entries,
    index_bits,
    quantize,
)
from fedbits.wire import Reader, Writer

WHAT = "client 3 uplink"
DTYPES = ("float32", "float16", "bfloat16", "int8")
FORMATS = [EntryFormat("reference", d, z) for d in DTYPES for z in (False, True)] + [
    EntryFormat("compact", d, z) for d in DTYPES for z in (False, True)
]
WIDTH = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
# The reference layout ignores dtype and zstd.
DISTINCT_FORMATS = [EntryFormat("reference")] + [f for f in FORMATS if f.layout == "compact"]
HEADER = {"float32": 0, "float16": 1, "bfloat16": 0, "int8": 4}


def _fid(fmt: EntryFormat) -> str:
    return f"{fmt.layout}-{fmt.dtype}-{'zstd' if fmt.zstd else 'raw'}"


def encode(idx, vals, pool_size, fmt, unique) -> bytes:
    w = Writer()
    idx, vals = np.asarray(idx, np.int64), np.asarray(vals, np.float64)
    encode_entries(w, idx, vals, pool_size, fmt, unique=unique)
    return w.getvalue()


def decode(payload: bytes, pool_size, fmt, max_count):
    r = Reader(payload, WHAT)
    out = decode_entries(r, pool_size, fmt, WHAT, max_count=max_count)
    r.finish()
    return out


def plain_sizes(n: int, pool_size: int, fmt: EntryFormat) -> dict[int, int]:
    """The documented byte size of each uncompressed representation, by tag."""
    if fmt.layout == "reference":
        return {0: 1 + 4 + 8 * n, 1: 1 + 4 * pool_size}
    w, h, b = WIDTH[fmt.dtype], HEADER[fmt.dtype], index_bits(pool_size)
    return {
        0: 1 + 4 + -(-n * b // 8) + h + w * n,
        1: 1 + h + w * pool_size,
        2: 1 + -(-pool_size // 8) + h + w * n,
    }


@st.composite
def entry_sets(draw, unique: bool):
    """A pool size and entries with values spanning many binades, zeros included."""
    pool_size = draw(st.one_of(st.integers(1, 80), st.integers(1, 4096), st.integers(1, 70_000)))
    if unique:
        full = draw(st.booleans())
        n = pool_size if full and pool_size <= 4096 else draw(st.integers(0, min(pool_size, 1500)))
    else:
        n = draw(st.integers(0, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    peak_exp = draw(st.integers(-100, 100))
    spread = draw(st.integers(0, 60))
    zeros = draw(st.sampled_from([0.0, 0.2, 1.0]))
    vals = rng.uniform(-1, 1, n) * 2.0**peak_exp * 2.0 ** -rng.integers(0, spread + 1, n)
    vals[rng.random(n) < zeros] = 0.0
    if unique:
        idx = np.sort(rng.choice(pool_size, n, replace=False))
    else:
        idx = rng.integers(0, pool_size, n)
    return pool_size, idx.astype(np.int64), vals


def check_round_trip(pool_size, idx, vals, fmt, unique):
    payload = encode(idx, vals, pool_size, fmt, unique)
    got_idx, got_vals = decode(payload, pool_size, fmt, max_count=max(len(idx), 1))
    want = quantize(vals, fmt)
    keep = want != 0.0 if unique else np.ones(len(want), bool)
    assert got_idx.dtype == np.int64 and got_vals.dtype == np.float64
    assert np.array_equal(got_idx, idx[keep])
    assert got_vals.tobytes() == want[keep].tobytes()  # bit for bit, signed zeros included

    sizes = plain_sizes(int(keep.sum()), pool_size, fmt)
    allowed = sizes if unique else {0: sizes[0]}
    tag = payload[0]
    if tag & 0x80:
        assert fmt.layout == "compact" and fmt.zstd and tag & 0x7F in allowed
        assert len(payload) == 1 + 4 + int.from_bytes(payload[1:5], "little")
    else:
        assert len(payload) == allowed[tag]
    assert len(payload) <= min(allowed.values())  # never larger than LIST in particular


@pytest.mark.parametrize("unique", [False, True], ids=["steps", "pool"])
@pytest.mark.parametrize("fmt", FORMATS, ids=_fid)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_equals_quantize_and_is_smallest(fmt, unique, data):
    pool_size, idx, vals = data.draw(entry_sets(unique))
    check_round_trip(pool_size, idx, vals, fmt, unique)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    peak_exp=st.integers(-100, 100),
    spread=st.integers(0, 60),
    n=st.integers(1, 300),
)
def test_quantisation_error_bounds(dtype, seed, peak_exp, spread, n):
    rng = np.random.default_rng(seed)
    vals = rng.uniform(-1, 1, n) * 2.0**peak_exp * 2.0 ** -rng.integers(0, spread + 1, n)
    vals[0] = 2.0**peak_exp * rng.uniform(0.5, 1)  # a known peak
    err = np.abs(quantize(vals, EntryFormat("compact", dtype)) - vals)
    peak = np.abs(vals).max()
    if dtype == "float32":
        assert (err <= 2.0**-24 * np.abs(vals) + 2.0**-150).all()
    elif dtype == "float16":
        assert (err <= 2.0**-11 * peak).all()
    elif dtype == "bfloat16":
        assert (err <= 2.0**-8 * np.abs(vals) + 2.0**-134).all()
    else:
        scale = float(np.float32(peak / 127))
        assert (err <= scale / 2 * (1 + 1e-9)).all()
    assert np.array_equal(quantize(vals, EntryFormat("reference", dtype)), vals.astype(np.float32))


def test_index_bits():
    pools = (1, 2, 3, 4, 5, 4096, 4097, 2**32)
    assert [index_bits(k) for k in pools] == [1, 1, 2, 2, 3, 12, 13, 32]
    with pytest.raises(ValueError):
        index_bits(0)


def test_exact_sizes():
    rng = np.random.default_rng(0)
    ref = EntryFormat("reference")
    dense = encode(np.arange(4096), rng.normal(size=4096), 4096, ref, True)
    assert dense[0] == 1 and len(dense) == 1 + 16384
    steps = encode(rng.integers(0, 4096, 200), rng.normal(size=200), 4096, ref, False)
    assert steps[0] == 0 and len(steps) == 1 + 4 + 1600
    compact = EntryFormat("compact", "float16", zstd=False)
    listed = encode(rng.integers(0, 4096, 200), rng.normal(size=200), 4096, compact, False)
    assert index_bits(4096) == 12
    assert listed[0] == 0 and len(listed) == 1 + 4 + 200 * 12 // 8 + 1 + 400


def test_representation_choice():
    """Sparse pools go as a list, half-full ones as a bitmask, full ones dense."""
    rng = np.random.default_rng(1)
    fmt = EntryFormat("compact", "float16", zstd=False)
    for n, tag in ((10, 0), (1000, 2), (4096, 1)):
        idx = np.sort(rng.choice(4096, n, replace=False))
        payload = encode(idx, rng.normal(size=n), 4096, fmt, True)
        assert payload[0] == tag
    zero_heavy = EntryFormat("compact", "float32", zstd=True)
    idx = np.arange(0, 4096, 2)
    assert encode(idx, np.ones(idx.size), 4096, zero_heavy, True)[0] & 0x80


def test_pool_drops_zero_entries_but_steps_keep_them():
    fmt = EntryFormat("compact", "int8", zstd=False)
    idx, vals = np.array([1, 3, 5]), np.array([1.0, 0.0, 1e-9])  # 1e-9 rounds to int8 0
    assert decode(encode(idx, vals, 8, fmt, True), 8, fmt, 3)[0].tolist() == [1]
    got_idx, got_vals = decode(encode(idx, vals, 8, fmt, False), 8, fmt, 3)
    assert got_idx.tolist() == [1, 3, 5] and got_vals.tolist() == quantize(vals, fmt).tolist()
    assert got_vals[1:].tolist() == [0.0, 0.0]


def test_float16_exponent_edges():
    fmt = EntryFormat("compact", "float16", zstd=False)
    for peak in (2.0**141 * 1.9, 2.0**-114, 2.0**-130, 1.0, 65504.0 * 4):
        vals = np.array([peak, -peak / 3, peak * 2**-20])
        got = decode(encode(np.arange(3), vals, 3, fmt, False), 3, fmt, 3)[1]
        assert got.tobytes() == quantize(vals, fmt).tobytes()
        assert abs(got[0] - peak) <= peak * 2**-11
    with pytest.raises(ValueError, match="overflow"):
        quantize(np.array([2.0**142]), fmt)


@pytest.mark.parametrize(
    "idx, vals, fmt, unique, match",
    [
        ([0], [np.nan], EntryFormat("compact"), False, "finite"),
        ([0], [np.inf], EntryFormat("reference"), False, "finite"),
        ([1, 0], [1.0, 1.0], EntryFormat("compact"), True, "ascending"),
        ([1, 1], [1.0, 1.0], EntryFormat("compact"), True, "ascending"),
        ([8], [1.0], EntryFormat("compact"), False, r"\[0, 8\)"),
        ([-1], [1.0], EntryFormat("compact"), False, r"\[0, 8\)"),
        ([0, 1], [1.0], EntryFormat("compact"), False, "shape"),
        ([0], [1e39], EntryFormat("reference"), False, "overflow"),
        ([0], [3.4e38], EntryFormat("compact", "bfloat16"), False, "overflow"),
        ([0], [1e300], EntryFormat("compact", "int8"), False, "overflow"),
    ],
)
def test_encoder_rejects_programming_errors(idx, vals, fmt, unique, match):
    with pytest.raises(ValueError, match=match):
        encode(idx, vals, 8, fmt, unique)


def _valid_fixtures():
    """One small valid encoding per layout × dtype × zstd × representation."""
    rng = np.random.default_rng(7)
    cases = []
    for fmt in DISTINCT_FORMATS:
        shapes = [(False, 50, 8), (True, 300, 5), (True, 40, 20), (True, 12, 12)]
        for unique, pool_size, n in shapes:
            if unique:
                idx = np.sort(rng.choice(pool_size, n, replace=False))
            else:
                idx = rng.integers(0, pool_size, n)
            vals = rng.normal(size=n) * 10.0 ** rng.integers(-3, 3, n)
            cases.append((fmt, pool_size, n, encode(idx, vals, pool_size, fmt, unique)))
        for unique in (False, True):  # regular enough for zstd to win
            idx, vals = np.arange(0, 96, 4), np.full(24, 0.5)
            cases.append((fmt, 96, 24, encode(idx, vals, 96, fmt, unique)))
    return cases


FIXTURES = _valid_fixtures()


def test_fixtures_cover_every_representation():
    tags = {(f.layout, f.zstd, p[0]) for f, _, _, p in FIXTURES}
    assert {("reference", True, t) for t in (0, 1)} <= tags
    assert {("compact", False, t) for t in (0, 1, 2)} <= tags
    assert {("compact", True, 0x80)} <= tags and {("compact", True, t) for t in (0x81, 0x82)} & tags
    assert all(t in (0, 1) for layout, _, t in tags if layout == "reference")


def test_truncation_at_every_offset_is_a_wire_error():
    for fmt, pool_size, n, payload in FIXTURES:
        for cut in range(len(payload)):
            with pytest.raises(WireError, match=WHAT):
                decode(payload[:cut], pool_size, fmt, n)


def test_errors_name_what_even_when_the_reader_names_another_payload():
    fmt, pool_size, n, payload = FIXTURES[0]
    with pytest.raises(WireError, match=WHAT):
        decode_entries(Reader(payload[:-1], "envelope"), pool_size, fmt, WHAT, max_count=n)


def test_bit_flips_are_wire_errors_or_valid_entries():
    """A flipped bit is caught, or changes the entries (a value bit) into other valid ones."""
    for fmt, pool_size, n, payload in FIXTURES:
        original = decode(payload, pool_size, fmt, n)
        for pos, bit in itertools.product(range(len(payload)), range(8)):
            bad = bytearray(payload)
            bad[pos] ^= 1 << bit
            try:
                idx, vals = decode(bytes(bad), pool_size, fmt, n)
            except WireError as e:
                assert WHAT in str(e)
                continue
            assert idx.dtype == np.int64 and vals.dtype == np.float64 and idx.shape == vals.shape
            assert len(idx) <= n and (idx >= 0).all() and (idx < pool_size).all()
            assert np.isfinite(vals).all()
            if not payload[0] & 0x80:  # a zstd frame header has a bit its decoder ignores
                same = np.array_equal(idx, original[0]) and vals.tobytes() == original[1].tobytes()
                assert not same


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def f32(*vals: float) -> bytes:
    return np.array(vals, "<f4").tobytes()


REF = EntryFormat("reference")
F16 = EntryFormat("compact", "float16", zstd=False)
F32 = EntryFormat("compact", "float32", zstd=False)
BF16 = EntryFormat("compact", "bfloat16", zstd=False)
I8 = EntryFormat("compact", "int8", zstd=False)


@pytest.mark.parametrize(
    "payload, pool_size, fmt, max_count, match",
    [
        # unknown tags, and tags the format does not allow
        (b"\x03", 8, EntryFormat("compact"), 8, "entries.tag"),
        (b"\x7f", 8, EntryFormat("compact"), 8, "entries.tag"),
        (b"\x02\x01" + f32(1), 8, REF, 8, "entries.tag"),  # no bitmask in the reference layout
        (b"\x80" + u32(0), 8, F32, 8, "entries.tag"),
        (b"\x80" + u32(0), 8, EntryFormat("reference", zstd=True), 8, "entries.tag"),
        # LIST count over max_count, and over what the bytes can hold
        (b"\x00" + u32(9) + bytes(100), 8, REF, 8, "entries.count"),
        (b"\x00" + u32(2**32 - 1), 8, REF, 2**40, "entries.count"),
        (b"\x00\x01\x00", 8, REF, 8, "entries.count"),  # truncated count
        # index 5 in a pool of 5, packed (3 bits) and u32
        (b"\x00" + u32(1) + b"\x05" + f32(1), 5, F32, 8, "entries.indices"),
        (b"\x00" + u32(1) + u32(5) + f32(1), 5, REF, 8, "entries.indices"),
        (b"\x00" + u32(1) + b"\x81" + f32(1), 8, F32, 8, "padding"),  # bit 7 past 3 index bits
        # bitmask: bit 5 set in a pool of 5; more entries than max_count
        (b"\x02\x20", 5, F32, 8, "entries.bitmask"),
        (b"\x02\x07" + f32(1, 1, 1), 8, F32, 2, "entries.bitmask"),
        # dense: more non-zero entries than max_count
        (b"\x01" + f32(1, 1, 1, 1), 4, REF, 3, "entries.values"),
        # a pool entry spelled as zero: -0.0 in DENSE, 0.0 under a BITMASK bit
        (b"\x01" + f32(1, -0.0), 2, REF, 2, "value 0"),
        (b"\x02\x03" + f32(1, 0), 2, F32, 2, "value 0"),
        # non-finite values in each float dtype
        (b"\x01" + f32(np.inf), 1, REF, 1, "non-finite"),
        (b"\x01\x00" + np.array([np.nan], "<f2").tobytes(), 1, F16, 1, "non-finite"),
        (b"\x01" + (0x7F80).to_bytes(2, "little"), 1, BF16, 1, "non-finite"),
        # int8: code -128, negative or non-finite scale
        (b"\x01" + f32(1) + b"\x80", 1, I8, 1, "-128"),
        (b"\x01" + f32(-1) + b"\x01", 1, I8, 1, "entries.values.scale"),
        (b"\x01" + f32(np.inf) + b"\x01", 1, I8, 1, "entries.values.scale"),
    ],
)
def test_decoder_rejects_malformed(payload, pool_size, fmt, max_count, match):
    with pytest.raises(WireError, match=match) as info:
        decode(payload, pool_size, fmt, max_count)
    assert WHAT in str(info.value)


def _zstd_payload(rep: int, body: bytes, **kw) -> bytes:
    data = zstandard.ZstdCompressor(level=3, **kw).compress(body)
    return bytes([0x80 | rep]) + u32(len(data)) + data


FMT_Z = EntryFormat("compact", "float32", zstd=True)
DENSE_BODY = np.array([1, 0, 2, 0], "<f4").tobytes()
LIST_BODY = u32(1) + b"\x02" + f32(2)  # index 2 → 2.0


@pytest.mark.parametrize(
    "payload, match",
    [
        (_zstd_payload(0, LIST_BODY + b"\0"), "trailing"),
        (_zstd_payload(1, DENSE_BODY), None),
        (_zstd_payload(1, DENSE_BODY, write_content_size=False), "declared size"),
        (_zstd_payload(1, DENSE_BODY * 100), "declared size"),
        (b"\x81" + u32(6) + b"garbag", "entries.zstd"),
        (b"\x81" + u32(0), "entries.zstd"),
    ],
)
def test_decoder_rejects_malformed_zstd(payload, match):
    if match is None:  # the well-formed control case
        idx, vals = decode(payload, 4, FMT_Z, 4)
        assert idx.tolist() == [0, 2] and vals.tolist() == [1.0, 2.0]
        return
    with pytest.raises(WireError, match=match) as info:
        decode(payload, 4, FMT_Z, 4)
    assert WHAT in str(info.value)


def test_decoder_rejects_bytes_after_the_zstd_frame():
    data = zstandard.ZstdCompressor().compress(DENSE_BODY) + b"\0\0"
    payload = b"\x81" + u32(len(data)) + data
    with pytest.raises(WireError, match="after the frame"):
        decode(payload, 4, FMT_Z, 4)


def test_entry_format_rejects_unknown_names():
    with pytest.raises(ValueError, match="layout"):
        EntryFormat("paper")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        EntryFormat("compact", "float8")  # type: ignore[arg-type]
