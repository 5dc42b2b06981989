"""Codec chains: round trips within the documented bounds, exact top-k, smallest index
coding, determinism, strict decoding of corrupt or crafted payloads, error feedback."""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbits.compress import Chain, ErrorFeedback, parse_chain
from fedbits.compress.indices import TAGS, coded_sizes, decode_indices, encode_indices
from fedbits.compress.sparsify import random_positions
from fedbits.errors import ClientError, ConfigError, WireError
from fedbits.wire import Reader

WHAT = "client 3 uplink"
SPARSIFIERS = [None, "topk:{d}", "topk_tensor:{d}", "randk:{d}"]
VALUES = [
    None,
    "fp32",
    "fp16",
    "bf16",
    "int8",
    "int8:sr",
    "int8:block=128",
    "int4",
    "int4:block=32,sr",
]
ALL_CHAINS = [
    [s for s in (sp, v, z) if s]
    for sp, v, z in itertools.product(SPARSIFIERS, VALUES, [None, "zstd"])
]
SPARSIFIER_NAMES = ("topk", "topk_tensor", "randk")
VALUE_NAMES = ("fp32", "fp16", "bf16", "int8", "int4")
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_chain(stages: list[str], density: str = "1/8") -> Chain:
    return parse_chain([s.format(d=density) for s in stages], field="method.uplink")


def value_stage(stages: list[str]) -> str | None:
    return next((s for s in stages if s.split(":")[0] in VALUE_NAMES), None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def split(n: int, rng: np.random.Generator) -> list[int]:
    """Random tensor sizes summing to n, empty tensors included."""
    cuts = np.sort(rng.integers(0, n + 1, size=int(rng.integers(0, 6))))
    return np.diff(np.concatenate(([0], cuts, [n]))).tolist()


@st.composite
def vectors(draw, max_abs_exp: int = 120):
    """Values spanning many binades, or all zero, or constant, or full of ties."""
    n = draw(st.integers(1, 5000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["spread", "spread", "zeros", "constant", "ties"]))
    exp = draw(st.integers(-140, max_abs_exp))
    if kind == "zeros":
        x = np.zeros(n)
    elif kind == "constant":
        x = np.full(n, rng.uniform(-1, 1) * 2.0**exp)
    elif kind == "ties":
        x = rng.integers(-3, 4, n) * 2.0**exp
    else:
        spread = draw(st.integers(0, 40))
        x = rng.uniform(-1, 1, n) * 2.0**exp * 2.0 ** -rng.integers(0, spread + 1, n)
    return torch.from_numpy(x.astype(np.float32)), split(n, rng)


# ---------------------------------------------------------------- bounds


def assert_values_within_bound(fmt: str | None, x: np.ndarray, got: np.ndarray) -> None:
    """The per-format bound of docs/compress.md, float32 rounding allowance included."""
    x, got = x.astype(np.float64), got.astype(np.float64)
    err = np.abs(x - got)
    name = (fmt or "fp32").split(":")[0]
    if name == "fp32":
        assert np.array_equal(x, got)
    elif name == "fp16":
        assert (err <= 2.0**-11 * np.abs(x) + 2.0**-25).all()
    elif name == "bf16":
        assert (err <= 2.0**-8 * np.abs(x) + 2.0**-134).all()
    else:
        qmax = 127 if name == "int8" else 7
        block = 64
        for option in fmt.split(":", 1)[1].split(",") if ":" in fmt else []:
            if option.startswith("block="):
                block = int(option[6:])
        pad = -len(x) % block
        scale = np.repeat(np.abs(np.pad(x, (0, pad))).reshape(-1, block).max(axis=1) / qmax, block)
        scale = scale[: len(x)] * (1 + 1e-6)
        allowance = 2.0**-22 * np.abs(x) + 1e-44
        bound = scale if "sr" in fmt else scale / 2
        assert (err <= bound + allowance).all(), float((err - bound).max())


def assert_selection(chain: Chain, x: np.ndarray, idx: np.ndarray, segs: list[int]) -> None:
    kind, density = chain.spec[0].split(":")
    assert (np.diff(idx) > 0).all() and (idx.size == 0 or 0 <= idx[0] and idx[-1] < x.size)

    def k(size: int) -> int:
        return min(size, max(1, math.ceil(Fraction(density) * size)))

    if kind == "randk":
        assert idx.size == k(x.size)
        return
    groups = (
        [(0, x.size)]
        if kind == "topk"
        else list(zip(np.cumsum([0, *segs[:-1]]), segs, strict=True))
    )
    for start, size in groups:
        part = idx[(idx >= start) & (idx < start + size)] - start
        assert part.size == k(size)
        mags = np.abs(x[start : start + size])
        kept = np.zeros(size, bool)
        kept[part] = True
        if kept.any() and (~kept).any():
            threshold = mags[kept].min()
            assert mags[~kept].max() <= threshold  # the k largest, ties allowed
            ties = np.flatnonzero(mags == threshold)
            # among ties at the threshold, the lowest positions win
            assert kept[ties].tolist() == sorted(kept[ties].tolist(), reverse=True)


@pytest.mark.parametrize("stages", ALL_CHAINS, ids=lambda s: "+".join(s) or "empty")
def test_every_chain_round_trips(stages):
    x = torch.from_numpy(np.random.default_rng(1).normal(size=300).astype(np.float32))
    segs = [100, 0, 150, 50]
    chain = make_chain(stages)
    payload = chain.encode(x, segments=segs, generator=gen())
    idx, vals = chain.decode_sparse(payload, numel=300, segments=segs, what=WHAT)
    dense = chain.decode(payload, numel=300, segments=segs, what=WHAT)
    assert idx.dtype == torch.int64 and vals.dtype == dense.dtype == torch.float32
    assert chain.is_sparse == (bool(stages) and stages[0].split(":")[0] in SPARSIFIER_NAMES)
    if chain.is_sparse:
        assert_selection(chain, x.numpy(), idx.numpy(), segs)
    else:
        assert torch.equal(idx, torch.arange(300))
    assert_values_within_bound(value_stage(stages), x.numpy()[idx.numpy()], vals.numpy())
    expected = torch.zeros(300)
    expected[idx] = vals
    assert torch.equal(dense, expected)


@PROPERTY
@given(data=st.data())
def test_round_trip_within_documented_bound(data):
    stages = data.draw(st.sampled_from(ALL_CHAINS))
    density = data.draw(st.sampled_from(["1/16", "0.3", "1", "0.001", "1/3"]))
    fp16 = "fp16" in stages
    x, segs = data.draw(vectors(max_abs_exp=13 if fp16 else 120))  # 'ties' reach 3·2^exp < 65504
    chain = make_chain(stages, density)
    payload = chain.encode(x, segments=segs, generator=gen(data.draw(st.integers(0, 9))))
    idx, vals = chain.decode_sparse(payload, numel=x.numel(), segments=segs, what=WHAT)
    if chain.is_sparse:
        assert_selection(chain, x.numpy(), idx.numpy(), segs)
    assert_values_within_bound(value_stage(stages), x.numpy()[idx.numpy()], vals.numpy())


def test_spec_is_normalised_and_equivalent_spellings_interoperate():
    a = parse_chain(["topk:1/16", "int8", "zstd"], field="f")
    b = parse_chain([" topk:0.0625", "int8:block=64", "zstd:level=19"], field="f")
    assert a.spec == ("topk:0.0625", "int8:block=64", "zstd:level=3")
    assert b.spec[:2] == a.spec[:2]
    x = torch.randn(1000, generator=gen())
    assert torch.equal(
        a.decode(b.encode(x), numel=1000, what=WHAT), b.decode(a.encode(x), numel=1000, what=WHAT)
    )
    assert parse_chain([], field="f").spec == () and not parse_chain([], field="f").is_sparse
    assert parse_chain(["int4:sr,block=32"], field="f").spec == ("int4:block=32,sr",)


def test_framing_is_small_and_sizes_follow_the_formulas():
    x = torch.randn(1000, generator=gen())
    assert len(make_chain([]).encode(x)) == 7 + 4000
    assert len(make_chain(["fp16"]).encode(x)) == 7 + 2000
    assert len(make_chain(["int8"]).encode(x)) == 7 + 4 * 16 + 1000
    assert len(make_chain(["int4:block=32"]).encode(x)) == 7 + 4 * 32 + 500
    assert len(make_chain(["randk:1/10", "bf16"]).encode(x, generator=gen())) == 7 + 8 + 2 * 100
    topk = make_chain(["topk:1/10"])
    idx = topk.decode_sparse(topk.encode(x), numel=1000, what=WHAT)[0].numpy()
    assert len(topk.encode(x)) == 7 + min(coded_sizes(idx, 1000).values()) + 4 * 100
    assert len(make_chain(["zstd"]).encode(torch.zeros(1000))) < 100  # 1 more framing byte


def test_zstd_keeps_the_raw_body_when_compression_does_not_pay():
    x = torch.randn(64, generator=gen())
    payload = make_chain(["zstd"]).encode(x)
    assert payload[3] == 0 and len(payload) == 8 + 256


def test_empty_vector():
    for stages in ALL_CHAINS:
        chain = make_chain(stages)
        payload = chain.encode(torch.zeros(0), segments=[0, 0], generator=gen())
        assert chain.decode(payload, numel=0, segments=[0, 0], what=WHAT).numel() == 0


# ---------------------------------------------------------------- top-k and random-k


def test_top_k_ties_are_broken_by_lowest_position():
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 3.0, 0.0])
    chain = make_chain(["topk:3/8"])
    idx, vals = chain.decode_sparse(chain.encode(x), numel=8, what=WHAT)
    assert idx.tolist() == [1, 2, 6] and vals.tolist() == [-2.0, 2.0, 3.0]
    per_tensor = make_chain(["topk_tensor:1/4"])
    idx, _ = per_tensor.decode_sparse(
        per_tensor.encode(x, segments=[4, 4]), numel=8, segments=[4, 4], what=WHAT
    )
    assert idx.tolist() == [1, 6]  # one per tensor of 4: ceil(4 / 4)


def test_density_counts_are_exact():
    chain = make_chain(["topk:0.1"])  # 0.1 · 30 is 3 exactly, not 3.0000000000000004 → 4
    assert chain.decode_sparse(chain.encode(torch.randn(30)), numel=30, what=WHAT)[0].numel() == 3
    tiny = make_chain(["topk:0.001"])
    assert tiny.decode_sparse(tiny.encode(torch.randn(10)), numel=10, what=WHAT)[0].numel() == 1


def test_random_k_positions_are_reproduced_uniform_and_pinned():
    x = torch.randn(5000, generator=gen())
    chain = make_chain(["randk:1/16"])
    payload = chain.encode(x, generator=gen(7))
    idx, vals = chain.decode_sparse(payload, numel=5000, what=WHAT)
    assert idx.numel() == 313 and torch.equal(vals, x[idx])  # the receiver found the same positions
    assert len(payload) == 7 + 8 + 4 * 313  # no index cost
    # The positions are a documented function of the seed (stable across library versions).
    assert random_positions(1, 1000, 5).tolist() == [444, 566, 745, 762, 971]
    assert random_positions(1, 10, 9).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # via the complement
    counts = np.zeros(40)
    for seed in range(2000):
        counts[random_positions(seed, 40, 4)] += 1
    assert counts.min() > 140 and counts.max() < 260  # 200 expected each


# ---------------------------------------------------------------- index coding


@st.composite
def index_sets(draw):
    n = draw(st.one_of(st.integers(1, 64), st.integers(1, 20_000)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from(["uniform", "clustered", "full", "empty"]))
    if shape == "full":
        return np.arange(n), n
    if shape == "empty":
        return np.zeros(0, np.int64), n
    count = int(rng.integers(0, n + 1) * draw(st.sampled_from([1.0, 0.1, 0.01])))
    if shape == "clustered":
        start = int(rng.integers(0, n - count + 1))
        return np.arange(start, start + count), n
    return np.sort(rng.choice(n, count, replace=False)), n


@PROPERTY
@given(index_sets())
def test_index_codings_round_trip_and_the_smallest_is_chosen(case):
    idx, n = case
    sizes = coded_sizes(idx, n)
    for coding in TAGS:
        data = encode_indices(idx, n, coding)
        assert len(data) == sizes[coding]
        r = Reader(data, WHAT)
        got = decode_indices(r, n, WHAT)
        r.finish()
        assert got.dtype == np.int64 and np.array_equal(got, idx)
    assert len(encode_indices(idx, n)) == min(sizes.values())


def test_index_coders_round_trip_at_ten_million():
    """Full scale (speed is bench/codec_throughput.py's business, not a test's)."""
    n = 10_000_000
    idx = np.sort(np.random.default_rng(0).choice(n, n // 16, replace=False))
    for coding in TAGS:
        got = decode_indices(Reader(encode_indices(idx, n, coding)), n, WHAT)
        assert np.array_equal(got, idx)


@pytest.mark.parametrize(
    "data, n, expected",
    [
        (bytes([0, 0x80]), 8, [7]),
        (bytes([0, 0x00, 0x01]), 9, [8]),
        (bytes([1, 2, 0b01, 0b101]), 4, [1, 2]),  # Elias–Fano, l = 1: low bits 1, 0; high 0, 1
        (bytes([2, 3, 0, 0, 5]), 100, [0, 1, 7]),  # gaps minus one
        (bytes([2, 2, 0x80, 0x01]), 1000, [128]),
    ],
)
def test_index_decoder_reads_hand_made_sets(data, n, expected):
    r = Reader(data, WHAT)
    assert decode_indices(r, n, WHAT).tolist() == expected
    r.finish()


@pytest.mark.parametrize(
    "data, n, message",
    [
        (bytes([9]), 10, "unknown index coding"),
        (bytes([0, 0x00, 0x02]), 9, "padding"),
        (bytes([2, 2, 0x80, 0x00]), 100, "redundant zero"),
        (bytes([2, 2, 5, 0x80]), 100, "cut short"),
        (bytes([2, 1, 100]), 100, "run past"),
        (bytes([2, 2, 50, 60]), 100, "not below"),
        (bytes([2, 9, 5]), 100, "9 bytes declared"),
        (bytes([1, 3]), 4, "truncated"),
        (bytes([1, 5]), 4, "5 positions out of 4"),
        (bytes([1, 2, 0b01, 0b1001]), 4, "padding"),
        (bytes([1, 2, 0b00, 0b0000_0001]), 4, "1 positions, expected 2"),
        (bytes([1, 2, 0b11, 0b011]), 4, "not strictly increasing"),
    ],
)
def test_index_decoder_is_strict(data, n, message):
    with pytest.raises(WireError, match=message):
        decode_indices(Reader(data, WHAT), n, WHAT)


def test_index_encoder_refuses_unsorted_or_out_of_range():
    for bad in ([3, 1], [1, 1], [-1], [10]):
        with pytest.raises(ValueError):
            encode_indices(np.array(bad), 10)


# ---------------------------------------------------------------- stochastic rounding, determinism


def test_stochastic_rounding_is_unbiased():
    x = torch.from_numpy(np.random.default_rng(3).uniform(-1, 1, 128).astype(np.float32))
    x[0] = x[64] = 1.0  # pin both blocks' scales: s = 1/7
    chain = make_chain(["int4:sr"])
    g = gen(11)
    trials = 400
    total = torch.zeros(128, dtype=torch.float64)
    for _ in range(trials):
        total += chain.decode(chain.encode(x, generator=g), numel=128, what=WHAT).double()
    bias = (total / trials - x.double()).abs()
    scale = 1 / 7
    assert bias.max() < 5 * scale / 2 / trials**0.5  # 5 σ, σ <= s/2 per draw
    # Nearest rounding's error is the same every time, so it does not average out.
    nearest = make_chain(["int4"]).decode(make_chain(["int4"]).encode(x), numel=128, what=WHAT)
    assert (nearest - x).abs().mean() > 5 * bias.mean()


@pytest.mark.parametrize(
    "stages", [["randk:1/8", "int8:sr", "zstd"], ["int4:block=32,sr"], ["topk_tensor:0.2", "bf16"]]
)
def test_same_generator_state_gives_the_same_bytes(stages):
    x = torch.randn(2000, generator=gen())
    chain = make_chain(stages)
    segs = [1000, 1000]
    assert chain.encode(x, segs, gen(5)) == chain.encode(x, segs, gen(5))
    if "sr" in stages[-1] or stages[0].startswith("randk"):
        assert chain.encode(x, segs, gen(5)) != chain.encode(x, segs, gen(6))


# ---------------------------------------------------------------- encoder refusals


def test_encoder_refuses_what_it_cannot_send():
    chain = make_chain(["fp16"])
    with pytest.raises(ValueError, match="overflow fp16"):
        chain.encode(torch.tensor([1.0, 65505.0]))
    chain.encode(torch.tensor([65504.0]))
    with pytest.raises(ValueError, match="overflow bf16"):
        make_chain(["bf16"]).encode(torch.tensor([3.4e38]))
    with pytest.raises(ValueError, match="non-finite"):
        make_chain(["int8"]).encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D float32"):
        make_chain([]).encode(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Generator"):
        make_chain(["randk:0.5"]).encode(torch.ones(4))
    with pytest.raises(ValueError, match="Generator"):
        make_chain(["int8:sr"]).encode(torch.ones(4))
    with pytest.raises(ValueError, match="segments"):
        make_chain(["topk_tensor:0.5"]).encode(torch.ones(4))
    with pytest.raises(ValueError, match="summing to 4"):
        make_chain(["topk:0.5"]).encode(torch.ones(4), segments=[1, 2])


def test_huge_and_tiny_magnitudes_quantise_within_bound():
    fmax = float(np.finfo(np.float32).max)
    x = torch.tensor(
        [fmax, -fmax, 3.0e38, 1.0, 0.0, 1e-45, -3e-44, 1e-40, 2e-38, 1e-45], dtype=torch.float32
    )
    for stages in (["int8:block=2"], ["int4:block=2"], ["int8:block=2,sr"], ["bf16"]):
        chain = make_chain(stages)
        values = x[2:] if stages == ["bf16"] else x  # ±3.4e38 round past bf16's largest
        got = chain.decode(chain.encode(values, generator=gen()), numel=values.numel(), what=WHAT)
        assert torch.isfinite(got).all()
        assert_values_within_bound(stages[0], values.numpy(), got.numpy())


# ---------------------------------------------------------------- strict decoding


SMALL_CHAINS = [
    [],
    ["topk:1/4", "int8", "zstd"],
    ["randk:1/4", "int4:sr"],
    ["topk_tensor:1/4", "fp16"],
    ["bf16", "zstd"],
]


@pytest.mark.parametrize("stages", SMALL_CHAINS, ids=lambda s: "+".join(s) or "empty")
def test_every_truncation_and_bit_flip_is_a_wire_error(stages):
    assert_truncations_and_bit_flips_are_wire_errors(make_chain(stages))


def assert_truncations_and_bit_flips_are_wire_errors(chain: Chain) -> None:
    x = torch.from_numpy(np.random.default_rng(2).normal(size=40).astype(np.float32))
    segs = [10, 30]
    payload = chain.encode(x, segs, gen())
    assert len(payload) < 200
    for cut in range(len(payload)):
        with pytest.raises(WireError, match=WHAT):
            chain.decode(payload[:cut], numel=40, segments=segs, what=WHAT)
    with pytest.raises(WireError, match=WHAT):
        chain.decode(payload + b"\0", numel=40, segments=segs, what=WHAT)
    for bit in range(8 * len(payload)):
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(WireError, match=WHAT):
            chain.decode(bytes(flipped), numel=40, segments=segs, what=WHAT)


def test_wrong_numel_segments_or_chain_are_wire_errors():
    x = torch.randn(100, generator=gen())
    chain = make_chain(["topk_tensor:0.1", "int8"])
    payload = chain.encode(x, segments=[50, 50])
    with pytest.raises(WireError, match="numel=99"):
        chain.decode(payload, numel=99, segments=[49, 50], what=WHAT)
    with pytest.raises(WireError, match="checksum"):
        chain.decode(payload, numel=100, segments=[40, 60], what=WHAT)
    for other in (
        ["topk_tensor:0.2", "int8"],
        ["topk_tensor:0.1", "int8:block=32"],
        ["topk:0.1", "int8"],
        ["topk_tensor:0.1", "int8", "zstd"],
        ["topk_tensor:0.1", "int4"],
    ):
        with pytest.raises(WireError, match="different codec chain"):
            make_chain(other).decode(payload, numel=100, segments=[50, 50], what=WHAT)
    dense = make_chain([]).encode(x)
    with pytest.raises(WireError, match="different codec chain"):
        make_chain(["fp16"]).decode(dense, numel=100, what=WHAT)
    assert torch.equal(make_chain(["fp32"]).decode(dense, numel=100, what=WHAT), x)  # [] means fp32


def reframe(
    chain: Chain,
    body: bytes,
    numel: int,
    segments: list[int] | None = None,
    coding: int | None = None,
) -> bytes:
    """A payload with a valid version, fingerprint and CRC around any body: what a
    buggy or hostile sender could produce (the CRC context is documented in chain.py)."""
    head = chain.encode(torch.zeros(numel), segments, gen())[:3]
    if coding is not None:
        head += bytes([coding])
    context = struct.pack("<Q", numel)
    if segments is not None and chain.spec[:1] and chain.spec[0].startswith("topk_tensor"):
        context += np.asarray(segments, "<u8").tobytes()
    frame = head + body
    return frame + struct.pack("<I", zlib.crc32(frame, zlib.crc32(context)))


@PROPERTY
@given(
    stages=st.sampled_from(ALL_CHAINS),
    body=st.binary(max_size=300),
    numel=st.integers(0, 300),
    coding=st.integers(0, 2),
)
def test_crafted_bodies_are_wire_errors_or_valid(stages, body, numel, coding):
    chain = make_chain(stages)
    segs = [numel // 2, numel - numel // 2]
    payload = reframe(chain, body, numel, segs, coding if "zstd" in stages else None)
    assert_wire_error_or_finite(chain, payload, numel, segs)


def assert_wire_error_or_finite(chain: Chain, payload: bytes, numel: int, segs: list[int]) -> None:
    try:
        out = chain.decode(payload, numel=numel, segments=segs, what=WHAT)
    except WireError as e:
        assert WHAT in str(e)
        assert "malformed payload" not in str(e)  # an explicit check caught it, not the net
    else:
        assert out.shape == (numel,) and torch.isfinite(out).all()


@PROPERTY
@given(
    stages=st.sampled_from(ALL_CHAINS),
    numel=st.integers(0, 300),
    edits=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_edited_valid_bodies_are_wire_errors_or_valid(stages, numel, edits):
    """Subtler than random bytes: a real body with a few bytes changed, inserted or
    removed (before compression), behind a valid checksum."""
    chain = make_chain(stages, density="0.3")
    segs = [numel // 2, numel - numel // 2]
    x = torch.from_numpy(np.random.default_rng(numel).normal(size=numel).astype(np.float32))
    payload = chain.encode(x, segs, gen())
    zstd = "zstd" in stages
    body = payload[4 if zstd else 3 : -4]
    compressed = zstd and payload[3] == 1
    if compressed:
        body = zstandard.ZstdDecompressor().decompress(body)
    edited = bytearray(body)
    for op, where, value in edits:
        if op == 0 and edited:
            edited[where % len(edited)] = value
        elif op == 1 and edited:
            del edited[where % len(edited)]
        else:
            edited.insert(where % (len(edited) + 1), value)
    body = zstandard.ZstdCompressor().compress(bytes(edited)) if compressed else bytes(edited)
    coding = payload[3] if zstd else None
    assert_wire_error_or_finite(chain, reframe(chain, body, numel, segs, coding), numel, segs)


def test_byte_stages_compose_each_bounded_by_the_one_before():
    chain = make_chain(["int8", "zstd:level=1", "zstd"])
    assert chain.spec == ("int8:block=64", "zstd:level=1", "zstd:level=3")
    x = torch.zeros(1000)
    payload = chain.encode(x)
    assert torch.equal(chain.decode(payload, numel=1000, what=WHAT), x)
    with pytest.raises(WireError, match="different codec chain"):
        make_chain(["int8", "zstd"]).decode(payload, numel=1000, what=WHAT)
    # The inner zstd inflates to at most the largest body (16 scales + 1000 codes), and
    # the outer one to at most what the inner one writes for that: one more byte.
    too_big = zstandard.ZstdCompressor().compress(bytes(1065))
    for outer, bound in ((bytes([1]) + too_big, 1064), (bytes(1066), 1065)):
        body = zstandard.ZstdCompressor().compress(outer)
        with pytest.raises(WireError, match=f"exceeds {bound} bytes"):
            chain.decode(reframe(chain, body, 1000, coding=1), numel=1000, what=WHAT)


def test_zstd_bomb_is_refused_before_inflating():
    chain = make_chain(["int8", "zstd"])
    bomb = zstandard.ZstdCompressor().compress(bytes(10_000_000))
    with pytest.raises(WireError, match="exceeds"):
        chain.decode(reframe(chain, bomb, 1000, coding=1), numel=1000, what=WHAT)
    with pytest.raises(WireError, match="neither raw"):
        chain.decode(reframe(chain, b"", 0, coding=7), numel=0, what=WHAT)


@pytest.mark.parametrize(
    "stages, body, message",
    [
        (["int8"], struct.pack("<f", float("nan")) + bytes(4), "scale"),
        (["int8"], struct.pack("<f", -1.0) + bytes(4), "scale"),
        (["int8"], struct.pack("<f", 1.0) + bytes([0x80, 0, 0, 0]), "-128"),
        (["int4"], struct.pack("<f", 1.0) + bytes([0x08, 0]), "-8"),
        (["int4:block=3"], struct.pack("<f", 1.0) + bytes([0x11, 0x10]), "padding nibble"),
        (["fp32"], struct.pack("<3f", 1.0, float("inf"), 0.0) + bytes(4), "non-finite"),
        (["fp16"], np.array([1, np.inf, 0, 0], "<f2").tobytes(), "non-finite"),
        (["bf16"], np.array([0x7FC0, 0, 0, 0], "<u2").tobytes(), "non-finite"),
        (["topk:1/2"], bytes([0, 0b0111]) + bytes(12), "3 positions"),
        ([], bytes(15), "15 bytes, but 4 values"),
        (["topk:1/2", "int4"], bytes([0, 0b0011]) + bytes(6), "6 bytes, but 2 values"),
    ],
)
def test_decoder_refuses_what_no_encoder_writes(stages, body, message):
    chain = make_chain(stages)
    numel = 3 if stages == ["int4:block=3"] else 4
    with pytest.raises(WireError, match=message):
        chain.decode(reframe(chain, body, numel), numel=numel, what=WHAT)


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "stages, fragment",
    [
        (["int9"], "unknown stage 'int9'"),
        (["topk"], "needs a density"),
        (["topk:0"], "(0, 1]"),
        (["topk:1.5"], "(0, 1]"),
        (["randk:abc"], "not a number"),
        (["topk:1/0"], "not a number"),
        (["topk:1e400"], "not a number"),
        (["topk:1e-400"], "(0, 1]"),
        (["int8:block=0"], "block=0"),
        (["int8:blk=4"], "unknown option 'blk'"),
        (["int8:sr=1"], "flag"),
        (["fp16:sr"], "takes no options"),
        (["zstd:level=99"], "level=99"),
        (["int8", "topk:0.1"], "out of order"),
        (["fp16", "int8"], "a second value format"),
        (["topk:0.1", "randk:0.1"], "a second sparsifier"),
        (["zstd", "int8"], "out of order"),
        ([3], "must be a string"),
        ("int8", "expected a list"),
    ],
)
def test_bad_specs_are_config_errors_listing_valid_stages(stages, fragment):
    with pytest.raises(ConfigError) as e:
        parse_chain(stages, field="method.uplink")
    message = str(e.value)
    assert message.startswith("method.uplink") and fragment in message
    assert "Valid stages: topk:<density>" in message and "zstd[:level=N]" in message


# ---------------------------------------------------------------- error feedback


class MemoryStore(dict):
    def put(self, key: str, value: bytes) -> None:
        self[key] = value


@pytest.mark.parametrize(
    "stages",
    [["topk:1/64"], ["topk_tensor:1/16", "int4:sr", "zstd"], ["randk:1/8", "fp16"], ["int8"]],
)
def test_error_feedback_loses_nothing(stages):
    n, segs = 3000, [1000, 2000]
    chain, store = make_chain(stages), MemoryStore()
    g = gen(1)
    sent = torch.zeros(n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for round_ in range(6):
        x = torch.randn(n, generator=gen(100 + round_))
        ef = ErrorFeedback(store, "fedit-residual", n)  # a fresh object each round, as on a client
        payload = ef.encode(chain, x, segments=segs, generator=g)
        sent += chain.decode(payload, numel=n, segments=segs, what=WHAT).double()
        total += x.double()
    residual = ErrorFeedback(store, "fedit-residual", n).residual().double()
    assert torch.allclose(sent + residual, total, atol=1e-4)
    assert len(store["fedit-residual"]) == 4 * n


def test_error_feedback_gets_closer_to_the_true_sum():
    # Without feedback the same 1/64 of the coordinates travel every round and the
    # error grows with every round; with it, each coordinate's mass arrives eventually.
    n, rounds = 1024, 100
    update = torch.randn(n, generator=gen(4))
    chain = make_chain(["topk:1/64"])
    truth = rounds * update.double()
    ef = ErrorFeedback(MemoryStore(), "residual", n)
    with_ef = sum(
        chain.decode(ef.encode(chain, update), numel=n, what=WHAT).double() for _ in range(rounds)
    )
    without = sum(
        chain.decode(chain.encode(update), numel=n, what=WHAT).double() for _ in range(rounds)
    )
    assert (with_ef - truth).norm() < 0.4 * (without - truth).norm()


def test_error_feedback_refuses_a_residual_of_the_wrong_size():
    store = MemoryStore({"fedit-residual": bytes(12)})
    with pytest.raises(ClientError, match="fedit-residual"):
        ErrorFeedback(store, "fedit-residual", 4).encode(make_chain(["topk:0.5"]), torch.ones(4))
