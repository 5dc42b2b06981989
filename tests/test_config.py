"""Configuration: validated up front, errors name the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbits.config import parse_override
from fedbits.errors import ConfigError
from fedbits.resolve import config_toml, load_config, resolved

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["tiny.toml", "quickstart.toml"])
def test_examples_validate(name):
    cfg = load_config(EXAMPLES / name)
    assert cfg.run.rounds >= 1
    assert config_toml(cfg)


def test_overrides_apply_with_types():
    cfg = load_config(EXAMPLES / "tiny.toml", ["clients.lr=1e-3", "method.lora_r=8",
                                              "run.name=x", "eval.metrics=['loss']"])
    assert cfg.clients.lr == 1e-3
    assert cfg.method.options()["lora_r"] == 8
    assert cfg.run.name == "x"
    assert cfg.eval.metrics == ["loss"]
    assert parse_override("data.source=builtin:tasks") == (["data", "source"], "builtin:tasks")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(EXAMPLES / "tiny.toml", ["method.target_modules=['q_proj']"])
    path = tmp_path / "c.toml"
    path.write_text(config_toml(cfg))
    reloaded = load_config(path)
    assert resolved(reloaded) == resolved(cfg)
    assert config_toml(reloaded) == config_toml(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("clients.learning_rate=1", r"clients\.learning_rate: unknown key \(allowed: .*lr"),
        ("clients.lr=fast", r"clients\.lr: "),
        ("data.partition=random",
         r"data\.partition: must be one of 'iid', 'dirichlet' or 'natural', got 'random'"),
        ("method.name=fedsgd",
         r"method\.name: unknown method 'fedsgd' \(available: .*fedavg.*fedit"),
        ("method.lora_rank=4", r"method\.lora_rank: unknown key \(allowed: name, .*lora_r"),
        ("model.name=no-such-model", r"model\.name: .*no-such-model"),
        ("model.name=./missing_dir", r"model\.name: .*missing_dir"),
        ("nosection.key=1", r"nosection: unknown key"),
        ("clients.per_round=0", r"clients\.per_round"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EXAMPLES / "tiny.toml", [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=1")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(EXAMPLES / "tiny.toml", ["clients.lr"])
