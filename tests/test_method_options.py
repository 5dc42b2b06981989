"""Method options as a user meets them: defaults that fit each other, refusals that say
what to change, and `fedbits methods -v` that lists them quickly and completely."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedbits.cli import main
from fedbits.errors import ConfigError
from fedbits.methods import available_methods, get_method
from fedbits.methods._dense import ADAPTIVE_SERVER_LR
from fedbits.resolve import load_config

from conftest import TINY


def _options(overrides: list[str]):
    cfg = load_config(TINY, overrides)
    return get_method(cfg.method.name).options.model_validate(cfg.method.options())


@pytest.mark.parametrize("method", ["fedavg", "fedit", "partial"])
@pytest.mark.parametrize(
    ("server_opt", "lr"),
    [("avg", 1.0), ("fedavgm", 1.0), ("fedadam", ADAPTIVE_SERVER_LR),
     ("fedyogi", ADAPTIVE_SERVER_LR), ("fedadagrad", ADAPTIVE_SERVER_LR)],
)
def test_server_lr_default_follows_the_server_optimizer(method, server_opt, lr):
    """Adaptive rules move every weight by about server_lr a round: at averaging's 1.0
    fedavg with fedadam went from eval loss 5.6 to 30.7."""
    opts = _options([f"method.name={method}", f"method.server_opt={server_opt}"])
    assert opts.server_lr == lr


@pytest.mark.parametrize("method", ["fedavg", "fedit", "partial"])
def test_an_explicit_server_lr_wins(method):
    opts = _options([f"method.name={method}", "method.server_opt=fedadam", "method.server_lr=0.5"])
    assert opts.server_lr == 0.5


@pytest.mark.parametrize(
    "overrides",
    [["method.name=fedavg"], ["method.name=partial"], ["method.name=fedcybgd"]],
)
def test_float16_weights_with_adamw_are_refused(overrides):
    """Full-parameter training in float16 with AdamW rejected every client of every round
    (non-finite loss): refused before any work, naming the keys and the way out."""
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides + ["model.dtype=float16"])
    message = str(err.value)
    assert "model.dtype" in message and "clients.optimizer" in message
    assert "bfloat16" in message and "float32" in message


@pytest.mark.parametrize(
    "overrides",
    [["method.name=fedit", "model.dtype=float16"], ["method.name=flasc", "model.dtype=float16"],
     ["method.name=partial", "method.lora=true", "model.dtype=float16"],
     ["method.name=fedavg", "clients.optimizer=sgd", "model.dtype=float16"],
     ["method.name=fedavg", "model.dtype=bfloat16"]],
)
def test_half_precision_is_allowed_where_it_trains(overrides):
    """LoRA adapters stay float32 whatever the model's dtype, SGD keeps no second moment,
    and bfloat16 has float32's range (fedit, partial with LoRA, fedavg with SGD or bfloat16
    each trained the tiny model without a rejection)."""
    load_config(TINY, overrides)


def test_a_codec_chain_given_as_one_string_gets_the_list_spelled_out():
    with pytest.raises(ConfigError, match=r'method\.uplink: a list, e\.g\. \["int8"\]'):
        load_config(None, ["method.name=fedit", "method.uplink=int8"])


def test_an_error_of_the_options_as_a_whole_is_keyed_method_without_pydantic_prefix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=fedavg", "method.wire_dtype=float16",
                           "method.uplink=['int8']"])
    message = str(err.value)
    assert message.startswith("defaults: method: set the value format")
    assert "Value error" not in message and "method.:" not in message


def test_methods_verbose_shows_real_defaults_choices_and_a_description_for_every_option(capsys):
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    blocks = {name: [] for name in available_methods()}
    current = None
    for line in out.splitlines():
        if line.startswith("    "):
            blocks[current].append(line.strip())
        else:
            current = line.split()[0]
    for name, all_lines in blocks.items():
        spec = get_method(name)
        # a method's own [clients] defaults come after its options
        declared = [line for line in all_lines if line.startswith("[clients] ")]
        assert declared == [f"[clients] {key} = {value!r} (this method's default)"
                            for key, value in spec.client_defaults.items()], name
        lines = all_lines[: len(all_lines) - len(declared)]
        fields = spec.options.model_fields
        assert [line.split(" = ")[0] for line in lines] == list(fields), name
        for line, field in zip(lines, fields.values(), strict=True):
            assert field.description and line.endswith(field.description), line
    partial = dict(line.split(" = ", 1) for line in blocks["partial"])
    assert partial["uplink"].startswith("['int8']")
    assert partial["server_opt"].startswith(
        "'avg' (avg | fedavgm | fedadam | fedyogi | fedadagrad)"
    )
    assert partial["lora_dropout"].startswith("0.05 (>= 0, < 1)")


def test_listing_methods_imports_no_model_data_or_flower_library():
    """`fedbits methods` and config validation import every method module: their top
    level stays light (fedbits.methods' rule), which made the listing several times faster."""
    heavy = ("transformers", "peft", "datasets", "flwr", "flwr_datasets")
    code = (
        "import sys\n"
        "from fedbits.methods import available_methods, describe_options, get_method\n"
        "for name in available_methods():\n"
        "    describe_options(get_method(name).options)\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
