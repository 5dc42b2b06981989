"""CG-FedLLM: the ``autoencoder`` codec stage held to the codec properties, and the
method's phases, bytes, reconstruction figures, checks of hostile claims and resume
across the TGAP → FAF boundary, on the tiny random model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedbits.compress import parse_chain
from fedbits.compress.stages.autoencoder import Autoencoder, weights_vector
from fedbits.errors import ClientError, ConfigError, WireError
from fedbits.methods import get_method
from fedbits.methods.cgfedllm import protocol
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.runtime.loop import client_data
from fedbits.runtime.setup import RunSetup, prepare_run
from fedbits.wire import header_size

from conftest import REPO, TINY, assert_same_final_and_ledger
from test_compress import (
    PROPERTY,
    WHAT,
    assert_truncations_and_bit_flips_are_wire_errors,
    assert_wire_error_or_finite,
    gen,
    reframe,
)

SMALL = ["eval.metrics=['loss']", "eval.max_examples=4", "clients.local_steps=2"]
HEAD = header_size("cgfedllm")
SMALL_AE = "autoencoder:ratio=1/8,chunk=64"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the codec stage


def test_the_latent_is_a_sixty_fourth_plus_a_scale_per_chunk():
    x = torch.randn(10_000, generator=gen())
    for latent, per_value in (("fp32", 4), ("fp16", 2)):
        chain = parse_chain([f"autoencoder:latent={latent}"])
        payload = chain.encode(x)
        chunks = math.ceil(10_000 / 4096)
        assert len(payload) == 7 + 4 * chunks + per_value * 64 * chunks
        y = chain.decode(payload, numel=10_000, what=WHAT)
        assert y.shape == (10_000,) and torch.isfinite(y).all()
    int8 = parse_chain(["autoencoder:latent=int8", "zstd"])
    assert int8.spec == ("autoencoder:ratio=1/64,chunk=4096,depth=3,channels=16,kernel=5,"
                         "latent=int8,seed=0", "zstd:level=3")
    assert torch.isfinite(int8.decode(int8.encode(x), 10_000, what=WHAT)).all()
    empty = parse_chain([SMALL_AE])
    assert empty.decode(empty.encode(torch.zeros(0)), 0, what=WHAT).shape == (0,)


def test_a_zero_chunk_comes_back_zero_and_scale_does_not_change_the_code():
    chain = parse_chain([SMALL_AE])
    x = torch.randn(128, generator=gen())
    x[64:] = 0
    y = chain.decode(chain.encode(x), 128, what=WHAT)
    assert torch.equal(y[64:], torch.zeros(64))
    z = chain.decode(chain.encode(x * 1000), 128, what=WHAT)
    assert torch.allclose(z, y * 1000, rtol=1e-5, atol=0)  # chunks are coded at unit RMS


def test_truncated_and_bit_flipped_latents_are_wire_errors():
    assert_truncations_and_bit_flips_are_wire_errors(parse_chain([SMALL_AE]))
    assert_truncations_and_bit_flips_are_wire_errors(parse_chain([f"{SMALL_AE},latent=int8",
                                                                  "zstd"]))


def test_a_latent_from_other_weights_or_another_shape_is_refused():
    stage = parse_chain([SMALL_AE])
    trained = _with_weights(SMALL_AE, version=1, shift=0.01)
    x = torch.randn(300, generator=gen())
    payload = trained.encode(x)
    for other in (stage, _with_weights(SMALL_AE, version=2, shift=0.01),
                  _with_weights(SMALL_AE, version=1, shift=0.02),
                  parse_chain(["autoencoder:ratio=1/8,chunk=128"]), parse_chain(["fp32"])):
        with pytest.raises(WireError, match="different codec chain"):
            other.decode(payload, numel=300, what=WHAT)
    assert torch.equal(trained.decode(payload, 300, what=WHAT),
                       _with_weights(SMALL_AE, version=1, shift=0.01).decode(payload, 300,
                                                                            what=WHAT))


def _with_weights(entry: str, version: int, shift: float):
    from fedbits.compress.registry import parse_stages
    from fedbits.methods.cgfedllm.protocol import Tap

    stages = parse_stages([entry], "test")
    stage = stages.values
    assert isinstance(stage, Autoencoder)
    trained = stage.trained(version, weights_vector(stage.network) + shift)
    return Tap(dataclasses.replace(stages, values=trained))


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_a_scale_no_encoder_writes_is_refused(scale):
    chain = parse_chain([SMALL_AE])
    body = struct.pack("<f", scale) + bytes(4 * 8)
    with pytest.raises(WireError, match="field values.scales"):
        chain.decode(reframe(chain, body, 64), numel=64, what=WHAT)


def test_decoding_is_bounded_by_the_receivers_count():
    """A short payload claimed for a huge vector is refused before anything is made."""
    chain = parse_chain([SMALL_AE])
    payload = chain.encode(torch.randn(40, generator=gen()))
    began = time.perf_counter()
    with pytest.raises(WireError, match=WHAT):
        chain.decode(payload, numel=10**12, what=WHAT)
    assert time.perf_counter() - began < 1


@PROPERTY
@given(body=st.binary(max_size=120), numel=st.integers(0, 200),
       latent=st.sampled_from(["fp32", "int8", "bf16"]))
def test_crafted_latents_are_wire_errors_or_finite(body, numel, latent):
    chain = parse_chain([f"{SMALL_AE},latent={latent}"])
    assert_wire_error_or_finite(chain, reframe(chain, body, numel), numel, [numel])


@pytest.mark.parametrize("entry, message", [
    ("autoencoder:ratio=1/3,chunk=64", "not a multiple"),
    ("autoencoder:ratio=3/4", "must be 1/F"),
    ("autoencoder:kernel=4", "must be odd"),
    ("autoencoder:latent=autoencoder", "is not one of"),
    ("autoencoder:width=3", "unknown option 'width'"),
])
def test_a_bad_autoencoder_entry_is_a_config_error(entry, message):
    with pytest.raises(ConfigError, match=message):
        parse_chain([entry], field="method.uplink")


# ---------------------------------------------------------------- the method in a run


def test_tgap_then_faf_bytes_from_the_ledger_and_figures_every_faf_round(tmp_path, one_thread):
    """6 rounds, TGAP 2 of them: dense both ways, then the encoder comes down once per
    client and the latent goes up, with the reconstruction figures every round."""
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", "run.rounds=6", *SMALL,
                             "method.name=cgfedllm", "method.audit_fraction=0"])
    run_dir = run_experiment(cfg)
    rows = _rows(run_dir / "metrics.jsonl")[1:]
    assert [r["server_stats"]["phase"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert [r["server_stats"]["encoder_version"] for r in rows] == [0, 0, 1, 1, 1, 1]
    for row in rows[2:]:
        stats = row["server_stats"]
        assert not row["rejected"]
        assert -1 <= stats["recon_cosine"] <= 1 and -1 <= stats["topk_cosine"] <= 1
        assert 0 <= stats["recon_rel_error"] < 1e3 and 0 <= stats["topk_rel_error"] <= 1
    assert "ae_train_loss" in rows[2]["server_stats"]
    assert not any("recon_cosine" in r["server_stats"] for r in rows[:2])

    setup = prepare_run(cfg)
    server = get_method("cgfedllm").server(setup.method_context())
    n, weights = server.numel, server.stage.num_weights
    dense_down = n * 4 + 8 + 1 + 8  # fingerprint, dtype, count, float32 values
    dense_up = 4 + 4 + 8 + 7 + 4 * n  # samples, loss, fingerprint, fp32 chain
    chunks = math.ceil(n / 4096)
    latent = 4 * chunks + 4 * 64 * chunks
    assert latent <= 4 * n / 64 + 4 * chunks  # 1/64 of the float32 update, and the scales
    faf_up = 1 + 4 + 16 + 4 + 4 + 8 + 7 + latent  # kind, version, claims, then the dense body
    encoder = 1 + 8 + 4 * weights
    downloads: dict[int, int] = {}
    for entry in _rows(run_dir / "ledger.jsonl"):
        faf = entry["round"] > 2
        if entry["direction"] == "up":
            assert entry["bytes"] == HEAD + (faf_up if faf else 1 + dense_up)
            continue
        sizes = {HEAD + 1 + 4 + 8 + 1 + dense_down, HEAD + 14 + encoder + dense_down} if faf \
            else {HEAD + 1 + dense_down}
        assert entry["bytes"] in sizes
        if entry["bytes"] > HEAD + 14 + dense_down:
            downloads[entry["client"]] = downloads.get(entry["client"], 0) + 1
    faf_clients = {c for r in rows[2:] for c in r["clients"]}
    assert downloads == dict.fromkeys(faf_clients, 1)  # once per client, never again
    assert sum(r["server_stats"].get("encoder_downloads", 0) for r in rows) == len(faf_clients)


def test_audits_confirm_the_claims_and_refreshes_publish_new_versions(tmp_path, one_thread):
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", "run.rounds=5", *SMALL,
                             "method.name=cgfedllm", "method.audit_fraction=1",
                             "method.refresh_every=2", "method.ae_epochs=2"])
    rows = _rows(run_experiment(cfg) / "metrics.jsonl")[1:]
    assert [r["server_stats"]["encoder_version"] for r in rows] == [0, 0, 1, 1, 2]
    for row in rows[2:]:
        stats = row["server_stats"]
        assert stats["audits"] == len(row["clients"]) and not row["rejected"]
        for name in ("recon_cosine", "recon_rel_error", "topk_cosine", "topk_rel_error"):
            assert abs(stats[f"audit_{name}"] - stats[name]) < 1e-5
    # a new version: every client of round 5 downloads it again
    assert rows[4]["server_stats"]["encoder_downloads"] == len(rows[4]["clients"])


# ---------------------------------------------------------------- hostile and lost clients


@pytest.fixture(scope="module")
def setup(one_thread) -> RunSetup:
    return prepare_run(load_config(TINY, SMALL))


def _halves(setup: RunSetup, *options: str):
    cfg = load_config(TINY, [*SMALL, "method.name=cgfedllm", *options])
    setup = dataclasses.replace(setup, cfg=cfg)
    spec = get_method("cgfedllm")
    return setup, spec.server(setup.method_context()), spec.client(setup.method_context())


class _Store(dict):
    def put(self, key: str, value: bytes) -> None:
        self[key] = value


def _round(setup, server, client, round_, clients, stores):
    """One round of bodies: every downlink first, then each client's uplink body."""
    downs = {c: server.downlink(round_, c) for c in clients}
    return {c: client.update(round_, c, downs[c], client_data(
        setup, setup.tokenize(setup.clients[c])[0], round_, c), stores[c]).body
        for c in clients}


def _faf_uplink(setup, *options):
    """Halves after a TGAP round (run.rounds 3: round 2 is FAF) and client 0's round-2
    uplink body."""
    setup, server, client = _halves(setup, *options)
    stores = {0: _Store(), 1: _Store()}
    ups = _round(setup, server, client, 1, [0, 1], stores)
    server.aggregate(1, [server.decode_uplink(1, c, b) for c, b in ups.items()])
    ups = _round(setup, server, client, 2, [0, 1], stores)
    return server, client, stores, ups[0]


def _claims_at(body: bytes, values: tuple[float, ...]) -> bytes:
    return body[:5] + struct.pack("<4f", *values) + body[21:]


@pytest.mark.parametrize("claims, field", [
    ((float("nan"), 0.1, 0.5, 0.5), "recon_cosine"),
    ((1.5, 0.1, 0.5, 0.5), "recon_cosine"),
    ((0.5, -0.1, 0.5, 0.5), "recon_rel_error"),
    ((0.5, 0.1, 0.5, float("inf")), "topk_rel_error"),
    ((0.5, 0.1, 0.5, 2.0), "topk_rel_error"),
])
def test_hostile_reconstruction_claims_are_rejected(setup, claims, field):
    server, _, _, body = _faf_uplink(setup, "method.audit_fraction=0")
    assert body[0] == protocol.LATENT
    with pytest.raises(ClientError, match=f"client 0 uplink: claims {field} = "):
        server.decode_uplink(2, 0, _claims_at(body, claims))
    server.decode_uplink(2, 0, body)  # the real one is accepted


def test_a_claim_the_audit_upload_contradicts_is_rejected(setup):
    server, _, _, body = _faf_uplink(setup, "method.audit_fraction=1")
    real = struct.unpack_from("<4f", body, 5)
    lie = (min(real[0] + 0.5, 1.0) if real[0] < 0.5 else real[0] - 0.5, *real[1:])
    with pytest.raises(ClientError, match="claims recon_cosine = .* but its dense audit "
                                          "upload gives"):
        server.decode_uplink(2, 0, _claims_at(body, lie))


def test_a_latent_of_another_autoencoder_version_is_refused(setup):
    server, _, _, body = _faf_uplink(setup, "method.audit_fraction=0")
    stale = body[:1] + struct.pack("<I", 7) + body[5:]
    with pytest.raises(ClientError, match="client 0 uplink: latent encoded with autoencoder "
                                          "version 7; the server decodes version 1"):
        server.decode_uplink(2, 0, stale)


def test_a_client_that_lost_its_autoencoder_sends_dense_and_gets_it_again(setup):
    server, client, stores, body = _faf_uplink(setup, "method.audit_fraction=0")
    server.decode_uplink(2, 0, body)
    assert 0 in server.holders
    down = server.downlink(3, 0)
    announce, _ = protocol.read_downlink(down, "down", server.stage.num_weights)
    assert announce is not None and announce.weights is None  # it holds version 1
    lost = _Store()  # a node whose store was wiped
    result = client.update(3, 0, down, client_data(
        setup, setup.tokenize(setup.clients[0])[0], 3, 0), lost)
    assert result.body[0] == protocol.DENSE and result.stats == {"encoder_missing": 1}
    server.decode_uplink(3, 0, result.body)
    assert 0 not in server.holders
    announce, _ = protocol.read_downlink(server.downlink(4, 0), "down", server.stage.num_weights)
    assert announce is not None and announce.weights is not None


def test_weights_that_do_not_match_their_digest_are_refused(setup):
    _, server, _ = _halves(setup)
    stage = server.stage.trained(1, weights_vector(server.stage.network))
    assert stage.weights is not None
    body = protocol.write_downlink(protocol.Announce(1, b"\0" * 8, stage.weights, False), b"")
    with pytest.raises(WireError, match="do not match the announced digest"):
        protocol.read_downlink(body, "downlink to client 0", stage.num_weights)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("first", [1, 3])
def test_resume_is_bit_exact_on_either_side_of_the_boundary(tmp_path, one_thread, first):
    """Stopped after round 1 (TGAP, 1 round of 1: the boundary then follows the longer
    run) or round 3 (FAF: the autoencoder comes back from the checkpoint), resumed to 4."""
    common = [f"run.out_dir={tmp_path}", *SMALL, "method.name=cgfedllm", "method.ae_epochs=3",
              "method.tgap_fraction=0.5", "method.audit_fraction=0.5"]
    straight = run_experiment(load_config(TINY, [*common, "run.name=s", "run.rounds=4"]))
    run_experiment(load_config(TINY, [*common, "run.name=r", f"run.rounds={first}"]))
    resumed = run_experiment(load_config(TINY, [*common, "run.name=r", "run.rounds=4"]),
                             resume=True)
    assert_same_final_and_ledger(straight, resumed)
    stats = [r["server_stats"] for r in _rows(resumed / "metrics.jsonl")[1:]]
    assert [s["phase"] for s in stats] == [0, 0, 1, 1]  # TGAP is 2 of 4 rounds, or of 3


def test_sigkill_across_the_boundary_then_resume_is_bit_identical(tmp_path):
    """The run is killed once TGAP's last round is done (mid-training of the autoencoder
    or in a FAF round) and resumed: weights and ledger equal an unkilled run's."""
    sets = [a for kv in [f"run.out_dir={tmp_path}", "run.rounds=4", "eval.every=100",
                         "eval.metrics=['loss']", "method.name=cgfedllm",
                         "method.tgap_fraction=0.5",
                         "method.audit_fraction=0.5"] for a in ("--set", kv)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "fedbits.cli", "run", str(TINY), *sets]
    ref = subprocess.run([*cli, "--set", "run.name=ref"], env=env, capture_output=True,
                         text=True, cwd=REPO)
    assert ref.returncode == 0, ref.stderr
    victim = tmp_path / "victim"
    proc = subprocess.Popen([*cli, "--set", "run.name=victim"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    metrics = victim / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= len(_rows(metrics)) < 5, "the run must be killed after TGAP, before its end"
    resumed = subprocess.run([*cli, "--set", "run.name=victim", "--resume"], env=env,
                             capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after round" in resumed.stdout
    assert [r["round"] for r in _rows(metrics)] == list(range(5))
    assert_same_final_and_ledger(tmp_path / "ref", victim)
    assert [r["server_stats"]["phase"] for r in _rows(metrics)[1:]] == [0, 0, 1, 1]


def test_options_refuse_what_cannot_run():
    base = ["method.name=cgfedllm"]
    for override, message in (("method.latent_ratio=0.3", "not 1/F"),
                              ("method.chunk=100", "not a multiple"),
                              ("method.uplink=['int8']", "list only byte stages"),
                              ("method.kernel=4", "must be odd")):
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, [*base, override])
    load_config(TINY, [*base, "method.uplink=['zstd']", "method.error_feedback=true"])
    np.testing.assert_equal(protocol.similarity(torch.zeros(3), torch.zeros(3)), (1.0, 0.0))
