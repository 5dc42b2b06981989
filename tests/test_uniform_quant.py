"""The ``uniform`` values stage (min-max quantisation at 1-8 bits) and the ``hadamard``
rotation stage: error bounds, unbiased stochastic rounding, exact sizes, an exact
inverse, hostile bodies refused, and both in a fedavg uplink end to end."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch

from fedbits.compress import parse_chain
from fedbits.compress.stages.hadamard import parse as parse_hadamard
from fedbits.compress.stages.uniform import UniformValues
from fedbits.compress.stages.uniform import parse as parse_uniform
from fedbits.errors import ConfigError, WireError
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment

from conftest import TINY

FRAME = 7  # version, fingerprint, CRC-32


def _vector(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _steps(x: torch.Tensor, bits: int, block: int) -> np.ndarray:
    """Each value's block step, (max − min)/(2^bits − 1)."""
    v = x.numpy()
    out = np.empty_like(v)
    for start in range(0, v.size, block):
        part = v[start:start + block]
        out[start:start + block] = (part.max() - part.min()) / ((1 << bits) - 1)
    return out


def _reframe(chain, payload: bytes, body: bytes, n: int) -> bytes:
    """``payload``'s head with another body and a CRC that matches it: what a hostile
    sender who knows the format writes."""
    frame = payload[:3] + body
    return frame + struct.pack("<I", zlib.crc32(frame, zlib.crc32(struct.pack("<Q", n))))


@pytest.mark.parametrize("bits", range(1, 9))
def test_nearest_rounding_is_within_half_a_step(bits):
    x = _vector(5000, bits)
    chain = parse_chain([f"uniform:bits={bits},block=128"])
    got = chain.decode(chain.encode(x), x.numel())
    bound = _steps(x, bits, 128) / 2 * (1 + 1e-6) + 2**-24 * x.abs().numpy()
    assert np.all((got - x).abs().numpy() <= bound)


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_stochastic_rounding_is_unbiased_and_within_a_step(bits):
    x = _vector(256, 1)
    chain = parse_chain([f"uniform:bits={bits},sr"])
    runs = torch.stack([chain.decode(chain.encode(x, generator=torch.Generator().manual_seed(s)),
                                     x.numel()) for s in range(400)])
    step = torch.from_numpy(_steps(x, bits, 64))
    assert torch.all((runs - x).abs() < step * (1 + 1e-6) + 1e-6)
    # each draw is off by at most a step: its mean over 400 seeds within 5 standard errors
    assert torch.all((runs.mean(0) - x).abs() <= 5 * step / 2 / 400**0.5 + 1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize(("count", "block"), [(1, 64), (63, 64), (1000, 64), (1000, 7)])
def test_bytes_are_the_documented_formula(bits, count, block):
    stage = UniformValues(bits, block)
    want = 8 * -(-count // block) + -(-count * bits // 8)
    assert stage.nbytes(count) == want
    assert sum(memoryview(p).nbytes for p in stage.encode(_vector(count), None)) == want
    chain = parse_chain([f"uniform:bits={bits},block={block}"])
    assert len(chain.encode(_vector(count))) == want + FRAME


def test_a_million_values_cost_bits_per_value_plus_the_block_heads():
    x = _vector(1 << 20)
    for bits in (1, 2, 4, 8):
        payload = parse_chain([f"uniform:bits={bits}"]).encode(x)
        assert len(payload) == (1 << 20) * bits // 8 + 8 * (1 << 20) // 64 + FRAME


@pytest.mark.parametrize("n", [0, 1, 3, 255, 256, 257, 1000])
@pytest.mark.parametrize("spec", ["hadamard", "hadamard:block=8"])
def test_hadamard_round_trip_is_exact_up_to_float32_rounding(n, spec):
    x = _vector(n, 3) * 100
    chain = parse_chain([spec])
    payload = chain.encode(x, generator=torch.Generator().manual_seed(n))
    got = chain.decode(payload, n)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5 * max(1.0, float(x.abs().max(0)[0]))
                               if n else 0)
    width = min(256 if spec == "hadamard" else 8, 1 << max(n - 1, 0).bit_length())
    assert len(payload) == FRAME + 8 + 4 * (-(-n // width) * width)  # seed + padded fp32


def test_hadamard_spreads_outliers_so_quantising_errs_less():
    x = _vector(4096, 4)
    x[::512] *= 100  # one outlier every 8 blocks of the quantiser
    errors = {}
    for chain_spec in (["uniform:bits=4"], ["hadamard", "uniform:bits=4"]):
        chain = parse_chain(chain_spec)
        got = chain.decode(chain.encode(x, generator=torch.Generator().manual_seed(0)), 4096)
        errors[len(chain_spec)] = float(((got - x) ** 2).mean())
    assert errors[2] < errors[1] / 2, errors


def test_hadamard_then_stochastic_rounding_stays_unbiased():
    x = _vector(64, 5)
    chain = parse_chain(["hadamard", "uniform:bits=2,sr"])
    runs = torch.stack([chain.decode(chain.encode(x, generator=torch.Generator().manual_seed(s)),
                                     64) for s in range(400)])
    spread = runs.std(0).max()
    assert torch.all((runs.mean(0) - x).abs() <= 5 * spread / 400**0.5)


@pytest.mark.parametrize(("field", "body"), [
    ("scales", struct.pack("<ff", float("nan"), 1.0) + bytes(8)),
    ("scales", struct.pack("<ff", 0.0, -1.0) + bytes(8)),
    ("scales", struct.pack("<ff", 3e38, 1e38) + bytes(8)),  # lo + 3·s beyond float32
    ("scales", struct.pack("<ff", float("inf"), 0.0) + bytes(8)),
    ("codes", struct.pack("<ff", 1.0, 0.0) + b"\x01" + bytes(7)),  # constant block, code 1
])
def test_uniform_refuses_what_no_encoder_writes(field, body):
    stage = UniformValues(2, 64)  # 32 values: 8 head bytes, 8 code bytes
    with pytest.raises(WireError, match=f"values.{field}"):
        stage.decode(memoryview(body), 32, "hostile")


def test_uniform_refuses_a_set_padding_bit():
    stage = UniformValues(3, 64)  # 3 values: 9 bits, so 7 padding bits in 2 bytes
    body = struct.pack("<ff", 0.0, 1.0) + bytes([0, 0b10])
    with pytest.raises(WireError, match="padding bit"):
        stage.decode(memoryview(body), 3, "hostile")
    assert stage.decode(memoryview(body[:-1] + b"\x01"), 3, "ok").tolist() == [0, 0, 4]


def test_a_rotated_body_that_overflows_or_is_short_is_refused():
    chain = parse_chain(["hadamard:block=4", "fp32"])
    x = _vector(4)
    payload = chain.encode(x, generator=torch.Generator().manual_seed(0))
    seed = payload[3:11]
    huge = _reframe(chain, payload, seed + np.full(4, 3e38, "<f4").tobytes(), 4)
    with pytest.raises(WireError, match="non-finite"):
        chain.decode(huge, 4)
    with pytest.raises(WireError, match="rotation"):
        chain.decode(_reframe(chain, payload, seed[:5], 4), 4)
    for i in range(len(payload)):  # any flipped bit fails the checksum or the fingerprint
        bad = bytearray(payload)
        bad[i] ^= 1
        with pytest.raises(WireError):
            chain.decode(bytes(bad), 4)


@pytest.mark.parametrize(("stages", "message"), [
    (["uniform"], "needs bits=N"),
    (["uniform:bits=0"], r"bits=0 must lie in \[1, 8\]"),
    (["uniform:bits=9"], r"bits=9 must lie in \[1, 8\]"),
    (["uniform:bits=2,block=0"], "block=0"),
    (["uniform:bits=2,rank=3"], "unknown option"),
    (["hadamard:block=3"], "power of two"),
    (["hadamard:block=1"], "block=1 must lie"),
    (["uniform:bits=2", "hadamard"], "out of order"),
    (["hadamard", "hadamard"], "a second rotation"),
    (["hadamard", "topk:1/4"], "out of order"),
])
def test_bad_entries_are_config_errors(stages, message):
    with pytest.raises(ConfigError, match=message):
        parse_chain(stages, field="method.uplink")


def test_specs_and_fingerprints():
    assert parse_uniform("bits=3,sr").spec == "uniform:bits=3,block=64,sr"
    assert parse_hadamard(None).spec == "hadamard:block=256"
    x = _vector(100)
    gen = torch.Generator().manual_seed(0)
    payload = parse_chain(["hadamard", "uniform:bits=4"]).encode(x, generator=gen)
    with pytest.raises(WireError, match="different codec chain"):
        parse_chain(["hadamard:block=128", "uniform:bits=4"]).decode(payload, 100)
    with pytest.raises(WireError, match="different codec chain"):
        parse_chain(["uniform:bits=4"]).decode(payload, 100)
    # sr changes the encoder only: a nearest-rounding receiver reads it
    sr = parse_chain(["uniform:bits=4,sr"]).encode(x, generator=gen)
    assert parse_chain(["uniform:bits=4"]).decode(sr, 100).shape == (100,)


def test_fedavg_uplink_with_hadamard_and_uniform_end_to_end(tiny_overrides):
    common = tiny_overrides + ["method.name=fedavg", "run.rounds=2", "eval.metrics=['loss']"]
    plain = run_experiment(load_config(TINY, common + ["run.name=plain"]))
    packed = run_experiment(load_config(TINY, common + [
        "run.name=packed", "method.uplink=['hadamard', 'uniform:bits=2,sr']"]))

    def up_bytes(run) -> float:
        rows = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
        ups = [r["bytes"] for r in rows if r["direction"] == "up"]
        return sum(ups) / len(ups)

    assert up_bytes(packed) < up_bytes(plain) / 8  # 32 → 2 bits, plus heads and padding
    rows = [json.loads(x) for x in (packed / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["rejected"] for r in rows)
    assert all(np.isfinite(r["eval_loss"]) for r in rows)
