"""A run configuration checked against what it names: the method, its options, the model.

:mod:`fedbits.config` checks a file's structure and imports nothing of fedbits but its
errors, because the methods and the model loader import it for their option types. The
checks that need the method registry and the model names sit here, above all three, so
no import runs in a circle. Programs read configs with :func:`load_config`, which does
both; :func:`resolved` is what a run records in ``config.toml`` and compares on
``--resume``.

The registry and the model loader are imported inside the functions: importing this
module (the ClientApp does, for every Flower message) loads neither torch nor
transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fedbits.config import Config, dumps_toml, read_config, validation_message
from fedbits.errors import ConfigError


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (or the defaults when None), apply ``--set`` overrides and validate
    everything, the method's own options and the model name included."""
    cfg = read_config(path, overrides)
    apply_client_defaults(cfg)
    validate_references(cfg, "defaults" if path is None else str(path))
    return cfg


def apply_client_defaults(cfg: Config) -> None:
    """Give every ``[clients]`` key the user did not set the value the method declares
    (:attr:`~fedbits.methods.base.MethodSpec.client_defaults`), in place.

    A key then counts as set, so applying again changes nothing, and the run's
    ``config.toml`` (and the config a Flower run ships to its nodes) holds the values
    the run trains with. An unknown method is left for :func:`validate_references`."""
    from fedbits.methods import get_method

    try:
        spec = get_method(cfg.method.name)
    except ConfigError:
        return
    for key, value in spec.client_defaults.items():
        if key not in cfg.clients.model_fields_set:
            setattr(cfg.clients, key, value)


def validate_references(cfg: Config, origin: str = "config") -> None:
    """Check the names that refer to registries: the method (and its options) and the
    model. ``origin`` (a file name) starts every error message."""
    from fedbits.methods import get_method
    from fedbits.models import check_model_name, check_model_size

    try:
        spec = get_method(cfg.method.name)
    except ConfigError as e:
        raise ConfigError(f"{origin}: method.name: {e}") from None
    try:
        options = spec.options.model_validate(cfg.method.options())
    except ValidationError as e:
        raise ConfigError(_describe_method(e, origin, spec.options)) from None
    refusal = options.privacy_refused()
    if cfg.privacy is not None and refusal is not None:
        raise ConfigError(f"{origin}: [privacy] is not supported by method.name = "
                          f"{cfg.method.name!r}: {refusal}")
    try:
        options.check_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    try:
        check_model_name(cfg.model.name)
    except Exception as e:  # ModelError from models
        raise ConfigError(f"{origin}: model.name: {e}") from None
    try:
        check_model_size(cfg.model)  # its messages name the model.* keys themselves
    except Exception as e:  # ModelError from models
        raise ConfigError(f"{origin}: {e}") from None


def resolved(cfg: Config) -> dict[str, Any]:
    """Every value the run uses, the method's own option defaults included: what
    ``config.toml`` records and what ``--resume`` compares."""
    from fedbits.methods import get_method

    data = cfg.model_dump(mode="json", exclude_none=True)
    options = get_method(cfg.method.name).options.model_validate(cfg.method.options())
    data["method"] = {"name": cfg.method.name,
                      **options.model_dump(mode="json", exclude_none=True)}
    return data


def config_toml(cfg: Config) -> str:
    """:func:`resolved` as TOML text, the ``config.toml`` of a run directory."""
    return dumps_toml(resolved(cfg))


def _describe_method(err: ValidationError, origin: str, options: type[BaseModel]) -> str:
    """One line per error, keyed ``method.<option>``; an error of the options as a whole
    (a model validator's, with no location) is keyed ``method``, or by nothing when its
    message already names the keys."""
    lines = []
    for e in err.errors():
        key = ".".join(["method", *(str(p) for p in e["loc"])])
        msg = validation_message(e)
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(["name", *sorted(options.model_fields)])
            msg = f"unknown key (allowed: {allowed})"
        elif e["type"] == "list_type" and isinstance(e["input"], str):
            item = e["input"]  # TOML `uplink = "int8"` or `--set method.uplink=int8`
            msg = f'a list, e.g. ["{item}"]'
        lines.append(f"{origin}: {msg}" if not e["loc"] and msg.startswith("method.")
                     else f"{origin}: {key}: {msg}")
    return "\n".join(lines)
