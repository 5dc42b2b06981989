"""The ``powersgd`` values stage: rank-r factors by one power iteration; exact for a
matrix of rank <= r, error falling with the rank, its byte formula, strict decoding,
error feedback, and as a method's uplink chain end to end on tiny models."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbits.compress import ErrorFeedback, parse_chain
from fedbits.compress.stages.powersgd import PowerSGDValues
from fedbits.errors import ConfigError, WireError
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment

from conftest import TINY, save_small_llama

FRAME = 7  # version, fingerprint, CRC (fedbits.compress.chain)

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def low_rank(rows: int, cols: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)


def roundtrip(stages: list[str], x: torch.Tensor, seed: int = 0) -> tuple[bytes, torch.Tensor]:
    chain = parse_chain(stages)
    payload = chain.encode(x.reshape(-1), generator=gen(seed))
    return payload, chain.decode(payload, x.numel(), what="test")


@pytest.mark.parametrize(("shape", "rank", "stages"), [
    ((576, 576), 4, ["powersgd:rank=4"]),
    ((576, 576), 3, ["powersgd:rank=4"]),  # rank below r
    ((100, 40), 2, ["powersgd:rank=2,cols=40"]),  # a non-square matrix, its width given
])
def test_exact_for_a_matrix_of_rank_at_most_r(shape, rank, stages):
    m = low_rank(*shape, rank)
    payload, out = roundtrip(stages, m)
    # float32 rounding only: 576-long dot products, relative error ~1e-7 per value
    assert (out - m.reshape(-1)).norm() < 1e-4 * m.norm()
    assert (out - m.reshape(-1)).abs().max() < 1e-4 * m.abs().max()


def test_error_falls_with_the_rank():
    # a decaying spectrum, as a gradient's: singular values 1/(i+1)
    g = gen(3)
    u, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    v, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    m = (u * (1.0 / torch.arange(1, 257))) @ v.T
    errors = [(roundtrip([f"powersgd:rank={r}"], m)[1] - m.reshape(-1)).norm().item()
              for r in (1, 2, 4, 8, 16, 64, 256)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-4 * errors[0]  # full rank: exact


@pytest.mark.parametrize(("count", "spec", "rows", "cols", "rank"), [
    (576 * 576, "powersgd:rank=4", 576, 576, 4),
    (1000, "powersgd:rank=4", 32, 32, 4),  # 1000 values fold into 32 x 32, 24 padded
    (1001, "powersgd:rank=8", 32, 32, 8),
    (10, "powersgd:rank=8", 3, 4, 3),  # the rank is capped by the matrix
    (1000, "powersgd:rank=2,cols=100", 10, 100, 2),
    (1, "powersgd", 1, 1, 1),
    (0, "powersgd", 0, 0, 0),
])
def test_byte_count_is_four_r_times_m_plus_n(count, spec, rows, cols, rank):
    stage = parse_chain([spec])
    x = torch.randn(count, generator=gen(count))
    payload = stage.encode(x, generator=gen(0))
    assert len(payload) == FRAME + 4 * rank * (rows + cols)
    assert PowerSGDValues(*_options(spec)).shape(count) == (rows, cols, rank)
    assert stage.decode(payload, count).shape == (count,)


def _options(spec: str) -> tuple[int, int]:
    opts = dict(item.split("=") for item in spec.partition(":")[2].split(",") if item)
    return int(opts.get("rank", 4)), int(opts.get("cols", 0))


def test_same_generator_same_bytes_and_the_spec_is_normalised():
    x = torch.randn(5000, generator=gen(1))
    assert roundtrip(["powersgd"], x, 7)[0] == roundtrip(["powersgd:rank=4"], x, 7)[0]
    assert roundtrip(["powersgd"], x, 7)[0] != roundtrip(["powersgd"], x, 8)[0]
    assert parse_chain(["powersgd:cols=64,rank=2"]).spec == ("powersgd:rank=2,cols=64",)
    with pytest.raises(ConfigError, match=r"rank=0 must lie in \[1, 4096\]"):
        parse_chain(["powersgd:rank=0"], field="method.uplink")


def test_hostile_bodies_are_refused():
    chain = parse_chain(["powersgd:rank=4"])
    n = 60 * 60
    payload = chain.encode(low_rank(60, 60, 8).reshape(-1), generator=gen(0))
    with pytest.raises(WireError, match="shorter than|checksum"):
        chain.decode(payload[:-9], n, what="up")
    flipped = bytearray(payload)
    flipped[40] ^= 0x10
    with pytest.raises(WireError, match="checksum mismatch"):
        chain.decode(bytes(flipped), n, what="up")
    with pytest.raises(WireError, match="checksum mismatch"):  # encoded for another size
        chain.decode(payload, n - 1, what="up")
    with pytest.raises(WireError, match="different codec chain"):
        parse_chain(["powersgd:rank=2"]).decode(payload, n, what="up")

    # bodies with a valid frame (what a hostile sender can craft): the stage's checks
    stage = PowerSGDValues(rank=4)
    rows, cols, r = stage.shape(n)
    body = bytearray(payload[3:-4])
    assert len(body) == stage.nbytes(n) == 4 * r * (rows + cols)
    stage.decode(memoryview(bytes(body)), n, "up")  # the honest body decodes
    nan = bytearray(body)
    struct.pack_into("<f", nan, 4 * rows * r + 8, float("nan"))  # in Q
    with pytest.raises(WireError, match="up: field values.factors: non-finite"):
        stage.decode(memoryview(bytes(nan)), n, "up")
    scaled = np.frombuffer(bytes(body), "<f4").copy()
    scaled[: rows * r] *= 2  # P's columns no longer unit length: Q can no longer be trusted
    with pytest.raises(WireError, match="up: field values.p: columns are not orthonormal"):
        stage.decode(memoryview(scaled.tobytes()), n, "up")


def test_composes_with_error_feedback():
    class Store(dict):
        def put(self, key: str, value: bytes) -> None:
            self[key] = value

    # a full-rank update sent 30 times at rank 4: without feedback the same low-rank part
    # arrives each time; with it, what was missed is sent later
    n, rounds = 64 * 64, 30
    update = torch.randn(n, generator=gen(4))
    chain, store = parse_chain(["powersgd:rank=4"]), Store()
    sent, without = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for round_ in range(rounds):
        ef = ErrorFeedback(store, "residual", n)
        sent += chain.decode(ef.encode(chain, update, generator=gen(round_)), n).double()
        without += chain.decode(chain.encode(update, generator=gen(round_)), n).double()
    truth = rounds * update.double()
    residual = ErrorFeedback(store, "residual", n).residual().double()
    torch.testing.assert_close(sent + residual, truth, rtol=0, atol=1e-3)  # nothing is lost
    assert (sent - truth).norm() < 0.4 * (without - truth).norm()


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory) -> str:
    return save_small_llama(tmp_path_factory.mktemp("models") / "two-layer-llama", 2)


def _up_bytes(run_dir: Path) -> set[int]:
    rows = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return {r["bytes"] for r in rows if r["direction"] == "up"}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "extra"), [
    ("fedcybgd", []),
    ("fedit", ["method.error_feedback=true"]),
])
def test_as_a_method_uplink_end_to_end(tmp_path, two_layers, method, extra):
    common = [f"run.out_dir={tmp_path}", f"model.name={two_layers}", f"method.name={method}",
              "run.rounds=2", "clients.local_steps=2", "eval.metrics=['loss']",
              "eval.max_examples=8"]
    psgd = run_experiment(load_config(TINY, common + ["run.name=p", *extra,
                                                      "method.uplink=['powersgd:rank=2']"]))
    # the same run with fp32 and fp16 values: their difference is 2 bytes a value
    exact, half = (run_experiment(load_config(TINY, common + [
        f"run.name={fmt}", f"method.uplink=['{fmt}']"]))
        for fmt in ("fp32", "fp16"))
    (p_up,), (e_up,), (h_up,) = _up_bytes(psgd), _up_bytes(exact), _up_bytes(half)
    count = (e_up - h_up) // 2
    assert e_up - p_up == 4 * count - PowerSGDValues(rank=2).nbytes(count)  # only values differ
    assert p_up < h_up < e_up
    rows = _metrics(psgd)
    assert all(not row.get("rejected") for row in rows[1:])
    assert all(math.isfinite(row["eval_loss"]) for row in rows)

