"""Random architectures (``random:llama*``): preset sizes, size keys, errors, determinism,
a run end to end, and generation of ids the byte tokenizer does not know.

Nothing here builds a preset at its real size: counts are checked analytically and on
``torch.device("meta")`` (no memory), and models are built at tiny sizes via the keys.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedbits.cli import main
from fedbits.config import ModelSection
from fedbits.errors import ConfigError, ModelError
from fedbits.eval.generate import greedy_generate
from fedbits.models import (
    RANDOM_PRESETS,
    SIZE_KEYS,
    SMOLLM2_PARAMS,
    build_byte_tokenizer,
    check_model_name,
    check_model_size,
    load_model,
    load_tokenizer,
    random_llama_config,
    random_shape,
)
from fedbits.resolve import load_config
from fedbits.runtime import run_experiment

from conftest import REPO, TINY

RANDOM_1B = REPO / "examples" / "random-1b.toml"

TINY_SIZE = {"hidden_size": 64, "num_layers": 2, "intermediate_size": 128, "num_heads": 4,
             "num_kv_heads": 2, "vocab_size": 1000}
"""Size keys that make any preset a model of about 0.2M parameters."""


def _tiny(name: str = "random:llama", **kw: object) -> ModelSection:
    return ModelSection.model_validate({"name": name, **TINY_SIZE, **kw})


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _meta_parameters(section: ModelSection) -> int:
    """The parameter count of the real model, built on the meta device: shapes, no data."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_llama_config(section))
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", list(RANDOM_PRESETS))
def test_preset_count_matches_the_built_architecture(name: str) -> None:
    section = ModelSection(name=name)
    assert _meta_parameters(section) == random_shape(section).parameters
    assert RANDOM_PRESETS[name].description


def test_presets_have_the_real_models_sizes() -> None:
    count = {name: p.parameters for name, p in RANDOM_PRESETS.items()}
    assert count["random:llama"] == SMOLLM2_PARAMS  # the real SmolLM2-135M, exactly
    assert count["random:llama-360m"] == 361_821_120  # SmolLM2-360M
    assert count["random:llama-1b"] == 1_100_048_384  # TinyLlama-1.1B
    for name in RANDOM_PRESETS:
        check_model_name(name)
        check_model_size(ModelSection(name=name))


@pytest.mark.parametrize("name", list(RANDOM_PRESETS))
def test_presets_build_at_a_tiny_size_with_the_byte_tokenizer(name: str, one_thread) -> None:
    model, tok = load_model(_tiny(name))
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 2, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.tie_word_embeddings == RANDOM_PRESETS[name].tie_word_embeddings
    # the embedding keeps the configured vocabulary; the tokenizer only uses ids < 259
    assert model.get_input_embeddings().weight.shape == (1000, 64)
    assert len(tok) == 259 and tok.get_vocab() == build_byte_tokenizer().get_vocab()
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert sum(p.numel() for p in model.parameters()) == random_shape(_tiny(name)).parameters
    logits = model(torch.tensor([tok.encode("hello")])).logits
    assert logits.shape == (1, 5, 1000)
    assert load_tokenizer(_tiny(name)).get_vocab() == tok.get_vocab()


def test_weights_are_created_in_the_model_dtype(one_thread) -> None:
    model, _ = load_model(_tiny(dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_building_logs_the_parameter_count(caplog, one_thread) -> None:
    with caplog.at_level("INFO", logger="fedbits.models"):
        load_model(_tiny())
    n = random_shape(_tiny()).parameters
    assert f"{n / 1e6:.1f}M parameters" in caplog.text and "hidden 64, 2 layers" in caplog.text


# ----------------------------------------------------------------------- size keys


def test_size_keys_override_only_what_they_name() -> None:
    cfg = random_llama_config(ModelSection(name="random:llama-1b", num_layers=3, vocab_size=512))
    assert (cfg.num_hidden_layers, cfg.vocab_size) == (3, 512)
    assert (cfg.hidden_size, cfg.intermediate_size) == (2048, 5632)  # the preset's
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 4)
    assert cfg.tie_word_embeddings is False


def test_size_keys_in_a_config_reach_the_model(tmp_path) -> None:
    sets = [f"model.{k}={v}" for k, v in TINY_SIZE.items()]
    cfg = load_config(TINY, ["model.name=random:llama-360m", *sets])
    assert random_shape(cfg.model).parameters == _meta_parameters(cfg.model)
    assert random_llama_config(cfg.model).hidden_size == 64


def test_size_key_with_a_checkpoint_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden_size.*random architecture.*tiny-llama"):
        load_config(TINY, ["model.hidden_size=64"])  # TINY's model is tiny-llama
    with pytest.raises(ModelError, match=r"model\.num_layers, model\.vocab_size: .*'org/name'"):
        check_model_size(ModelSection(name="org/name", num_layers=2, vocab_size=300))
    with pytest.raises(ModelError, match=r"model\.num_layers"):
        load_model(ModelSection(name="tiny-gpt2", num_layers=2))


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"hidden_size": 100},
         r"model\.hidden_size = 100 is not divisible by model\.num_heads = 9 \(from random:"),
        ({"num_heads": 8},
         r"model\.num_heads = 8 is not divisible by model\.num_kv_heads = 3 \(from random:"),
        ({"num_heads": 4, "num_kv_heads": 8},
         r"model\.num_heads = 4 is not divisible by model\.num_kv_heads = 8"),
        ({"hidden_size": 36, "num_heads": 4, "num_kv_heads": 1},
         r"model\.hidden_size = 36 / model\.num_heads = 4 = 9 is odd"),
    ],
)
def test_bad_shapes_name_the_keys(sizes: dict[str, int], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        check_model_size(ModelSection(name="random:llama", **sizes))
    sets = [f"model.{k}={v}" for k, v in sizes.items()]
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, ["model.name=random:llama", *sets])


def test_out_of_range_size_keys_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        load_config(TINY, ["model.name=random:llama", "model.vocab_size=100"])


def test_unknown_random_architecture_suggests_one() -> None:
    with pytest.raises(ModelError, match=r"'random:lama'.*did you mean 'random:llama'"):
        check_model_name("random:lama")
    with pytest.raises(ModelError, match="random:llama-1b"):
        check_model_name("no-such-model")  # the general message lists them as well


def test_size_keys_are_the_config_fields() -> None:
    assert set(SIZE_KEYS) <= set(ModelSection.model_fields)


# --------------------------------------------------------------------- determinism


def test_random_architectures_are_deterministic_per_seed(one_thread) -> None:
    a, _ = load_model(_tiny(), seed=3)
    b, _ = load_model(_tiny(), seed=3)
    c, _ = load_model(_tiny(), seed=4)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_building_leaves_the_global_rng_alone(one_thread) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_model(_tiny(), seed=9)
    assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------- generation, runs


def test_generating_ids_beyond_the_tokenizer_does_not_crash(one_thread) -> None:
    model, tok = load_model(_tiny("random:llama-1b"))  # untied: the head can be replaced
    head = torch.nn.Linear(64, 1000, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.normal_()
        head.bias[:259] = -1e4  # every greedy token is an id the tokenizer does not have
    model.lm_head = head
    texts = greedy_generate(model, tok, ["hello", "a longer prompt"], max_length=32,
                            max_new_tokens=4, batch_size=2)
    assert texts == ["", ""]
    assert tok.batch_decode([[75, 700, 76]], skip_special_tokens=True) == ["HI"]


def test_the_example_validates_at_full_size() -> None:
    cfg = load_config(RANDOM_1B)
    assert random_shape(cfg.model).parameters == RANDOM_PRESETS["random:llama-1b"].parameters


def test_a_run_on_a_tiny_random_architecture(tmp_path, one_thread) -> None:
    """The 1B example end to end, shrunk by the size keys; exact match makes the random
    model generate, mostly ids the byte tokenizer does not have."""
    sets = [f"model.{k}={v}" for k, v in TINY_SIZE.items()]
    cfg = load_config(RANDOM_1B, [f"run.out_dir={tmp_path}", *sets, "run.rounds=1",
                                  "data.builtin_per_task=4", "eval.max_examples=4",
                                  "eval.metrics=['loss', 'exact_match']"])
    run_dir = run_experiment(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["bytes_up"] > 0 and rows[1]["exact_match"] == 0
    assert math.isfinite(rows[1]["eval_loss"])
    assert "hidden_size = 64" in (run_dir / "config.toml").read_text()


def test_models_command_lists_the_presets(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in RANDOM_PRESETS:
        assert name in out
    assert "smollm2-135m" in out and "1100M parameters" in out and "362M parameters" in out
