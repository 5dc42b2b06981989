"""The codec stage registry: built-in stages by role, a stage from a plugin found through
its ``fedbits.codecs`` entry point, and that plugin stage held to the guarantees of the
built-in ones (exact sizes, strict bounded decoding) and run in a method's uplink.

The plugin is ``tests/plugins/fedbits_signs`` (1-bit signs with a scale per block),
with the ``.dist-info`` metadata an installed package would have; putting its folder on
``sys.path`` is all it takes for ``importlib.metadata`` to find it.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedbits.compress import available_stages, register_stage
from fedbits.compress.chain import Chain
from fedbits.compress.indices import coded_sizes
from fedbits.compress.registry import Stages
from fedbits.compress.stages.floats import FloatValues
from fedbits.errors import ConfigError, WireError
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment
from fedbits.wire import header_size

from conftest import REPO, TINY
from test_compress import (
    PROPERTY,
    WHAT,
    assert_truncations_and_bit_flips_are_wire_errors,
    assert_wire_error_or_finite,
    gen,
    make_chain,
    reframe,
    vectors,
)

PLUGINS = REPO / "tests" / "plugins"
SIGN_CHAINS = [
    ["sign1"],
    ["sign1:block=16", "zstd"],
    ["topk:1/4", "sign1", "zstd"],
    ["randk:1/8", "sign1:block=8"],
    ["topk_tensor:0.3", "sign1"],
]


@pytest.fixture(scope="module", autouse=True)
def signs_plugin():
    """The plugin's folder on sys.path, as if it were installed."""
    sys.path.insert(0, str(PLUGINS))
    importlib.invalidate_caches()
    yield
    sys.path.remove(str(PLUGINS))


# ---------------------------------------------------------------- the registry


def test_builtin_and_plugin_stages_are_registered_by_role():
    stages = {info.name: info for info in available_stages()}
    roles = [info.role for info in available_stages()]
    assert roles == sorted(roles, key=["positions", "transform", "values", "bytes"].index)
    named = ("topk", "randk", "hadamard", "fp16", "int4", "uniform", "sign1", "zstd")
    assert {n: stages[n].role for n in named} == {
        "topk": "positions", "randk": "positions", "hadamard": "transform", "fp16": "values",
        "int4": "values", "uniform": "values", "sign1": "values", "zstd": "bytes"}
    assert stages["sign1"].usage == "sign1[:block=N]"
    plugin = [ep for ep in entry_points(group="fedbits.codecs") if ep.name == "sign1"]
    assert [(ep.value, ep.dist.name) for ep in plugin] == [("fedbits_signs", "fedbits-signs")]


def test_an_unknown_stage_lists_every_registered_one_plugins_included():
    with pytest.raises(ConfigError) as e:
        make_chain(["topk:1/4", "sign2"])
    message = str(e.value)
    assert message.startswith("method.uplink[1] 'sign2': unknown stage 'sign2'")
    assert "Valid stages: topk:<density>, topk_tensor:<density>, randk:<density> (sp" in message
    assert "uniform:bits=N[,block=N][,sr], sign1[:block=N] (value formats" in message
    assert "hadamard[:block=N] (rotations, at most one, before the value format)" in message
    assert "zstd[:level=N] (byte stages, last)" in message


@pytest.mark.parametrize(
    "stages, fragment",
    [
        (["sign1:block=0"], "block=0 must lie in [1, 1048576]"),
        (["sign1:blk=4"], "unknown option 'blk' (allowed: block)"),
        (["sign1", "int8"], "a second value format"),
        (["sign1", "topk:0.1"], "out of order: sparsifier"),
    ],
)
def test_a_plugin_stage_is_validated_like_a_builtin(stages, fragment):
    with pytest.raises(ConfigError, match="method.uplink") as e:
        make_chain(stages)
    assert fragment in str(e.value)


def test_a_plugin_installed_after_the_first_chain_is_still_found():
    """In a fresh interpreter: the registry has loaded (without the plugin) when the
    plugin appears on the path; the unknown name makes it look again."""
    code = (
        "import sys\n"
        "from fedbits.compress import parse_chain\n"
        "parse_chain(['topk:0.5', 'int8'])\n"
        f"sys.path.insert(0, {str(PLUGINS)!r})\n"
        "print(parse_chain(['sign1', 'zstd']).spec)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "('sign1:block=64', 'zstd:level=3')"


def test_a_plugin_that_fails_to_load_is_a_config_error_naming_it(tmp_path, monkeypatch):
    meta = tmp_path / "broken-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text("[fedbits.codecs]\nbroken = fedbits_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="codec plugin broken = 'fedbits_no_such_module'"):
        make_chain(["no_such_stage"])


def test_register_stage_refuses_a_taken_name_and_bad_names():
    with pytest.raises(ValueError, match="'int8' is already registered"):
        register_stage("int8", lambda argument: FloatValues("fp16"), role="values")
    with pytest.raises(ValueError, match="lowercase"):
        register_stage("Sign-1", lambda argument: FloatValues("fp16"), role="values")
    with pytest.raises(ValueError, match="role 'value'"):
        register_stage("sign9", lambda argument: FloatValues("fp16"), role="value")  # type: ignore[arg-type]
    assert "sign9" not in {info.name for info in available_stages()}


# ---------------------------------------------------------------- the chain checks every stage


class _Miscounting(FloatValues):
    """A values stage whose encoder writes one byte fewer than it documents."""

    def encode(self, values, generator):
        return [self.codes(values)[:-1]]


class _Infinite(FloatValues):
    """A values stage whose decoder lets a non-finite value through."""

    def decode(self, data, count, what):
        return torch.full((count,), float("inf"))


def test_the_chain_checks_what_any_stage_writes_and_returns():
    x = torch.ones(8)
    with pytest.raises(RuntimeError, match="wrote 28 bytes where it documents 32"):
        Chain(Stages(None, _Miscounting("fp32"), (), ("fp32",))).encode(x)
    payload = make_chain([]).encode(x)
    with pytest.raises(WireError, match=f"{WHAT}: field values: non-finite value"):
        Chain(Stages(None, _Infinite("fp32"), (), ("fp32",))).decode(payload, 8, what=WHAT)


# ---------------------------------------------------------------- the plugin stage


def signs_expected(x: np.ndarray, block: int) -> np.ndarray:
    """sign(x) · mean|x| of x's block, -0 and 0 counting as positive."""
    mags = np.zeros(-(-x.size // block) * block)
    mags[: x.size] = np.abs(x.astype(np.float64))
    sizes = np.minimum(block, x.size - np.arange(0, x.size, block))
    scale = np.repeat((mags.reshape(-1, block).sum(axis=1) / sizes).astype(np.float32), block)
    return np.where(x < 0, -scale[: x.size], scale[: x.size])


@pytest.mark.parametrize("stages", SIGN_CHAINS, ids="+".join)
def test_sign1_round_trips_at_its_documented_size(stages):
    x = torch.from_numpy(np.random.default_rng(5).normal(size=1000).astype(np.float32))
    x[:64] = 0.0  # an all-zero block comes back as zeros
    segs = [300, 0, 700]
    chain = make_chain(stages)
    payload = chain.encode(x, segments=segs, generator=gen())
    idx, vals = chain.decode_sparse(payload, numel=1000, segments=segs, what=WHAT)
    block = int(chain.spec[1 if chain.is_sparse else 0].split("=")[1])
    sent = x.numpy()[idx.numpy()]
    assert np.array_equal(vals.numpy(), signs_expected(sent, block))
    if "zstd" not in stages:
        signs = 4 * math.ceil(idx.numel() / block) + math.ceil(idx.numel() / 8)  # 1 bit a value
        if not chain.is_sparse:
            positions = 0
        elif stages[0].startswith("randk"):
            positions = 8  # the seed
        else:
            positions = min(coded_sizes(idx.numpy(), 1000).values())
        assert len(payload) == 7 + positions + signs


@pytest.mark.parametrize("stages", SIGN_CHAINS, ids="+".join)
def test_sign1_truncations_and_bit_flips_are_wire_errors(stages):
    assert_truncations_and_bit_flips_are_wire_errors(make_chain(stages))


def test_a_foreign_block_size_or_stage_is_refused():
    payload = make_chain(["sign1"]).encode(torch.randn(100, generator=gen()))
    for other in (["sign1:block=32"], ["int8"], ["fp16"]):
        with pytest.raises(WireError, match="different codec chain"):
            make_chain(other).decode(payload, numel=100, what=WHAT)


@pytest.mark.parametrize(
    "body, message",
    [
        (np.array([-1.0], "<f4").tobytes() + bytes(1), "field values.scales"),
        (np.array([np.nan], "<f4").tobytes() + bytes(1), "field values.scales"),
        (np.array([1.0], "<f4").tobytes() + bytes([0x10]), "padding bits"),
    ],
)
def test_sign1_decoder_refuses_what_no_encoder_writes(body, message):
    chain = make_chain(["sign1"])
    with pytest.raises(WireError, match=message):
        chain.decode(reframe(chain, body, 4), numel=4, what=WHAT)


@PROPERTY
@given(stages=st.sampled_from(SIGN_CHAINS), body=st.binary(max_size=300),
       numel=st.integers(0, 300), coding=st.integers(0, 2))
def test_sign1_crafted_bodies_are_wire_errors_or_valid(stages, body, numel, coding):
    chain = make_chain(stages)
    segs = [numel // 2, numel - numel // 2]
    payload = reframe(chain, body, numel, segs, coding if "zstd" in stages else None)
    assert_wire_error_or_finite(chain, payload, numel, segs)


@PROPERTY
@given(case=vectors(), stages=st.sampled_from(SIGN_CHAINS))
def test_sign1_round_trips_any_vector(case, stages):
    x, segs = case
    chain = make_chain(stages)
    idx, vals = chain.decode_sparse(chain.encode(x, segs, gen()), x.numel(), segs, WHAT)
    block = int(chain.spec[1 if chain.is_sparse else 0].split("=")[1])
    assert np.array_equal(vals.numpy(), signs_expected(x.numpy()[idx.numpy()], block))


# ---------------------------------------------------------------- in a run


def _ledger(run_dir, direction: str) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return [r["bytes"] for r in rows if r["direction"] == direction]


@pytest.mark.parametrize("uplink, feedback", [("['sign1']", "false"),
                                             ("['topk:1/4', 'sign1', 'zstd']", "true")])
def test_a_plugin_stage_works_in_method_uplink_without_editing_fedbits(
    tmp_path, one_thread, uplink, feedback
):
    cfg = load_config(TINY, [f"run.out_dir={tmp_path}", "run.rounds=1", "eval.metrics=['loss']",
                             "method.name=fedit", f"method.uplink={uplink}",
                             f"method.error_feedback={feedback}"])
    run_dir = run_experiment(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients"] and not any(r["rejected"] for r in rows)
    # The downlink is plain float32: fingerprint, dtype, count, 4 bytes per trainable value.
    (down,) = set(_ledger(run_dir, "down"))
    n = (down - header_size("fedit") - 8 - 1 - 8) // 4
    # The uplink: samples, loss, fingerprint, 7 bytes of framing, then for c values c/8
    # bytes of signs and a float32 scale per 64: 1.5 bits per value against float32's 32.
    fixed = header_size("fedit") + 4 + 4 + 8 + 7
    up = _ledger(run_dir, "up")
    if uplink == "['sign1']":
        assert set(up) == {fixed + math.ceil(n / 8) + 4 * math.ceil(n / 64)}
    else:  # a quarter of the values, their positions (at most a bitmask), zstd's flag
        k = math.ceil(n / 4)
        signs = math.ceil(k / 8) + 4 * math.ceil(k / 64)
        assert max(up) <= fixed + 1 + (1 + math.ceil(n / 8)) + signs
