"""The run configuration: one TOML file plus ``--set section.key=value`` overrides.

Everything is validated before any work starts. An unknown key or a wrong type gets
one :class:`~fedbits.errors.ConfigError` that names the key (``clients.lr``) and, where
there is a fixed set, the allowed values. Method options live in ``[method]`` next to
``name`` and are validated by the method's own options model, so adding a method never
edits this file.

This module checks the file's structure only, and imports neither the methods nor the
models (both import it). The names that refer to them (``method.name`` and its options,
``model.name``) are checked by :func:`fedbits.resolve.load_config`, which is what a
program reads a config with.
"""

from __future__ import annotations

import ast
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedbits.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


MAX_SEED = 2**32 - 1  # numpy's and torch's generators take seeds in [0, 2**32)

DType = Literal["float32", "bfloat16", "float16"]
"""A floating-point dtype by name: ``model.dtype``, and the methods' wire and pool dtypes."""
DTYPES: tuple[DType, ...] = get_args(DType)

EvalMetric = Literal["loss", "rougeL", "exact_match"]


class RunSection(_Section):
    name: str = Field(
        "quickstart", description="the run directory's name under out_dir: one directory "
        "name, no separators, '.' or '..' (so a run never writes or deletes outside out_dir)"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    rounds: int = Field(5, ge=0)
    out_dir: str = Field("runs", min_length=1)

    @field_validator("name")
    @classmethod
    def _one_directory_name(cls, name: str) -> str:
        if name.strip() in {"", ".", ".."}:
            raise ValueError(f"{name!r} is not a run name: give a directory name such as 'lr-1e-3'")
        if "/" in name or "\\" in name:
            raise ValueError(f"{name!r} must be a single directory name under run.out_dir "
                             "(no '/' or '\\'; set run.out_dir to choose where runs go)")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ValueError(f"{name!r} holds a control character (newline, tab, ...)")
        if len(name.encode()) > 200:
            raise ValueError("is longer than 200 bytes")
        return name


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,2})?")


class ModelSection(_Section):
    name: str = "smollm2-135m"
    dtype: DType = Field(
        "float32", description="the frozen weights' dtype and, when not float32, the autocast "
        "dtype of every forward; what trains keeps float32 master weights (docs/scale.md)"
    )
    revision: str | None = None
    device: str = Field(
        "auto", description="where the model, training, evaluation and aggregation run: "
        "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'; tensors "
        "leave it only at the wire"
    )
    # size keys of the random architectures (model.name = "random:llama"): None keeps
    # the preset's value (fedbits.models.RANDOM_PRESETS)
    hidden_size: int | None = Field(None, ge=8, le=65536)
    num_layers: int | None = Field(None, ge=1, le=1024)
    intermediate_size: int | None = Field(None, ge=8, le=262144)
    num_heads: int | None = Field(None, ge=1, le=1024)
    num_kv_heads: int | None = Field(None, ge=1, le=1024)
    vocab_size: int | None = Field(None, ge=259, le=1_048_576)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
        return device


class DataSection(_Section):
    source: str = "builtin:tasks"
    partition: Literal["iid", "dirichlet", "natural"] = "iid"
    partition_by: str = "task"
    alpha: float = Field(0.5, gt=0)
    num_clients: int = Field(10, ge=1)
    eval_split: Literal["fraction", "unseen"] = "fraction"
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    eval_values: list[str] = Field(
        default_factory=list,
        description="for eval_split='unseen': the partition_by values held out "
        "(empty: a random eval_fraction of the distinct values)",
    )
    eval_source: str | None = Field(
        None, description="a separate source used whole as the evaluation set"
    )
    builtin_per_task: int = Field(200, ge=1, description="examples per builtin task family")
    max_examples: int | None = Field(None, ge=1, description="cap on loaded examples")


class ClientsSection(_Section):
    per_round: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=8)
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass: "
        "less memory for about a third more compute per step"
    )
    optimizer_in_backward: bool | Literal["auto"] = Field(
        "auto", description="step each trained tensor as soon as backward has its gradient "
        "and free it (same result, one gradient held at a time); auto: when what trains is a "
        "quarter of the model or more (fedavg, large blocks), where the gradients cost memory"
    )

    @model_validator(mode="after")
    def _one_of_per_round_fraction(self) -> ClientsSection:
        if self.per_round is not None and self.fraction is not None:
            raise ValueError("set either clients.per_round or clients.fraction, not both")
        return self


class MethodSection(BaseModel):
    """``name`` plus the method's own options (validated by the method's registry entry)."""

    model_config = ConfigDict(extra="allow")
    name: str = "fedit"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _default_metrics() -> list[EvalMetric]:
    return ["loss", "exact_match"]


class EvalSection(_Section):
    every: int = Field(1, ge=1)
    metrics: list[EvalMetric] = Field(default_factory=_default_metrics)
    max_new_tokens: int = Field(32, ge=1)
    max_examples: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)


class RuntimeSection(_Section):
    kind: Literal["simulation", "flower"] = Field(
        "simulation", description="'flower' runs on a Flower SuperLink and its SuperNodes"
    )
    max_payload_mb: float = Field(4096.0, gt=0, description="reject payloads larger than this")
    client_state_mb: float = Field(
        256.0, ge=0, description="simulation: memory for per-client state kept between rounds "
        "(error-feedback residuals, seed pools); beyond it the least recently used spills to "
        "disk under the run directory"
    )
    superlink: str | None = Field(
        None, description="flower: the SuperLink connection, a [superlink.<name>] table in "
        "$FLWR_HOME/config.toml (None: that file's default)"
    )
    round_timeout_s: float = Field(
        600.0, gt=0, description="flower: how long the server waits for a round's replies; "
        "a node that has not replied by then is recorded as missing"
    )
    node_wait_s: float = Field(
        120.0, ge=0, description="flower: how long a round waits for SuperNodes serving its "
        "sampled partitions to connect"
    )


AttackName = Literal["scale", "nan", "huge", "random_bytes", "weight", "sign_flip"]
"""What a malicious client does to its uplink ([faults], docs/faults.md)."""
ATTACKS: tuple[AttackName, ...] = get_args(AttackName)


def _default_attack() -> list[AttackName]:
    return ["scale"]


def _probability(default: float, description: str) -> Any:
    """A probability or fraction in [0, 1]; strict, so ``true`` or ``"0.3"`` is an error."""
    return Field(default, ge=0, le=1, strict=True, allow_inf_nan=False, description=description)


def faults_refusal(kind: str) -> str:
    """Why a run with ``[faults]`` cannot go to ``runtime.kind = kind``."""
    return ("faults: the [faults] section is injected by the simulator only; on "
            f"runtime.kind = {kind!r} the faults are the real ones (a node that does not "
            "reply by runtime.round_timeout_s is recorded as missing): remove [faults] or "
            "run with runtime.kind = 'simulation'")


class FaultsSection(_Section):
    """Faults the simulator injects so a defence can be measured on a method
    (docs/faults.md). Every draw derives from ``run.seed``, the round and the client,
    so a run with faults is as reproducible, and resumes as exactly, as one without."""

    dropout: float = _probability(
        0.0, "probability a sampled client does not answer: its downlink is sent and "
        "counted, nothing comes back, the round goes on")
    straggler_fraction: float = _probability(
        0.0, "probability a sampled client is slow this round: its simulated time is "
        "client_seconds plus an exponential delay of mean straggler_delay_s")
    straggler_delay_s: float = Field(
        60.0, gt=0, allow_inf_nan=False, strict=True,
        description="mean simulated delay of a slow client, in seconds")
    client_seconds: float = Field(
        10.0, ge=0, allow_inf_nan=False, strict=True,
        description="simulated time of a client that is not slow, in seconds")
    deadline_s: float | None = Field(
        None, gt=0, allow_inf_nan=False, strict=True,
        description="a client whose simulated time exceeds this misses the round (None: "
        "no deadline, slow clients are only recorded); nothing sleeps")
    crash: float = _probability(
        0.0, "probability a sampled client dies during local training, after a uniformly "
        "drawn number of its local steps; its store writes of the round are undone")
    malicious_fraction: float = _probability(
        0.0, "fraction of all clients that are malicious, a set fixed for the whole run "
        "(at least one when above 0); they attack whenever they are sampled")
    attack: list[AttackName] = Field(
        default_factory=_default_attack, min_length=1,
        description=f"what a malicious client does, one of {', '.join(ATTACKS)}, or a "
        "list of them to mix (one drawn per round and client)")
    attack_scale: float = Field(
        1e6, allow_inf_nan=False, strict=True,
        description="the factor of the 'scale' attack on the client's change")

    @field_validator("attack", mode="before")
    @classmethod
    def _one_or_a_list(cls, attack: Any) -> Any:
        if isinstance(attack, float) and math.isnan(attack):
            attack = "nan"  # `--set faults.attack=nan` reads as TOML's float nan
        return [attack] if isinstance(attack, str) else attack

    @model_validator(mode="after")
    def _deadline_reachable(self) -> FaultsSection:
        if self.deadline_s is not None and self.deadline_s < self.client_seconds:
            raise ValueError(
                f"deadline_s={self.deadline_s:g} is below client_seconds="
                f"{self.client_seconds:g}: every client would miss every round")
        return self


AggregatorName = Literal["mean", "median", "trimmed_mean", "multi_krum"]


def _robust_number(description: str, default: float, least: float) -> Any:
    """A finite number of at least ``least``; strict, so ``"3"`` or ``true`` is an error."""
    return Field(default, ge=least, strict=True, allow_inf_nan=False, description=description)


class RobustSection(_Section):
    """How the server bounds what a client sends: its claimed weight, the size of its
    update, how updates combine, and a finite aggregate (docs/robust.md). The defaults
    defend, and leave a run in which no client exceeds a bound bit-identical to one
    without them."""

    aggregator: AggregatorName = Field(
        "mean", description="how a round's updates combine: 'mean' (weighted, folded one at a "
        "time), or the order statistics 'median' (coordinate-wise), 'trimmed_mean', "
        "'multi_krum', which hold the round's updates (cohort × trained tensors)")
    trim_fraction: float = Field(
        0.2, gt=0, lt=0.5, strict=True, description="trimmed_mean: the fraction of a round's "
        "updates dropped at each end of every coordinate (rounded down; at least one)")
    krum_f: int | None = Field(
        None, ge=0, strict=True, description="multi_krum: the attackers it assumes among a "
        "round's clients (None: the most it tolerates, (clients per round − 3) // 2)")
    krum_m: int | None = Field(
        None, ge=1, strict=True, description="multi_krum: the updates with the lowest Krum "
        "scores that are averaged (None: clients per round − krum_f)")
    norm_bound: float | Literal["auto", "off"] = Field(
        "auto", description="each update's L2 norm is clipped to this: 'auto' = norm_multiple "
        "× the median norm of the updates accepted in the last history_rounds rounds; a "
        "number; or 'off'")
    norm_multiple: float = _robust_number("the multiple of the median norm 'auto' clips to", 3.0, 1)
    server_weighting: Literal["samples", "uniform"] = Field(
        "samples", description="an update's weight in the mean: its claimed sample count "
        "(bounded by max_weight), or the same for every client")
    max_weight: int | Literal["auto"] = Field(
        "auto", description="the most a claimed sample count weighs: 'auto' = weight_multiple "
        "× the median claim of the last history_rounds rounds, or a number of samples")
    weight_multiple: float = _robust_number("the multiple of the median claim 'auto' caps at",
                                            4.0, 1)
    scalar_bound: float | Literal["auto", "off"] = Field(
        "auto", description="fedkseed: each uplink scalar is clipped to this: 'auto' = "
        "scalar_multiple × the median |scalar| of the last history_rounds rounds; a number; "
        "or 'off' (method.max_scalar still rejects a client beyond it)")
    scalar_multiple: float = _robust_number(
        "the multiple of the median |scalar| 'auto' clips to", 10.0, 1)
    history_rounds: int = Field(
        5, ge=1, le=10_000, strict=True, description="rounds of accepted updates whose medians "
        "the 'auto' bounds take; a round with no such history takes its own")

    @field_validator("norm_bound", "scalar_bound", mode="before")
    @classmethod
    def _auto_off_or_positive(cls, value: Any) -> Any:
        if value in ("auto", "off") or _positive_number(value):
            return value
        raise ValueError(f"must be 'auto', 'off' or a positive number, got {value!r}")

    @field_validator("max_weight", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> Any:
        if value == "auto" or (_positive_number(value) and isinstance(value, int)):
            return value
        raise ValueError(f"must be 'auto' or a whole number of samples >= 1, got {value!r}")

    def krum(self, cohort: int) -> tuple[int, int]:
        """Multi-Krum's (f, m) for a round of ``cohort`` updates: the configured ones,
        lowered where the round has fewer updates than the tolerance needs."""
        most = max(0, (cohort - 3) // 2)
        f = most if self.krum_f is None else min(self.krum_f, most)
        return f, min(self.krum_m or cohort - f, cohort - f)

    def check_cohort(self, cohort: int) -> None:
        """Refuse an aggregator whose parameters cannot work with ``cohort`` clients a round."""
        if self.aggregator == "trimmed_mean" and math.floor(self.trim_fraction * cohort) == 0:
            fix = (f"raise it to at least {math.ceil(1000 / cohort) / 1000:g}" if cohort > 2
                   else "sample at least 3 clients a round")
            raise ValueError(
                f"robust.trim_fraction={self.trim_fraction:g} trims nothing from a round of "
                f"{cohort} clients (it drops floor(trim_fraction × clients) at each end): "
                f"{fix}, or use robust.aggregator = 'median'")
        if self.aggregator != "multi_krum":
            return
        most = (cohort - 3) // 2
        if self.krum_f is not None and self.krum_f > most:
            raise ValueError(
                f"robust.krum_f={self.krum_f}: Multi-Krum tolerates f attackers among n clients "
                f"only when n >= 2f + 3; with {cohort} clients a round f is at most {max(most, 0)}")
        f, m = self.krum(cohort)
        if self.krum_m is not None and self.krum_m > cohort - f:
            raise ValueError(
                f"robust.krum_m={self.krum_m} keeps more than the {cohort - f} updates of a round "
                f"not assumed to be attackers ({cohort} clients − krum_f {f})")
        if m >= cohort:
            raise ValueError(
                f"robust.aggregator = 'multi_krum' with {cohort} clients a round tolerates no "
                "attacker (n >= 2f + 3) and keeps every update, which is the mean: sample at "
                "least 5 clients a round, set robust.krum_m below the cohort, or use 'median'")


class PrivacySection(_Section):
    """Client-level differential privacy, DP-FedAvg (McMahan et al. 2018; docs/privacy.md):
    each client's whole update is clipped to ``clip_norm`` and Gaussian noise of standard
    deviation ``noise_multiplier`` × ``clip_norm`` is added once to the round's sum, so
    one client's presence moves what the server releases by a bounded, noised amount.
    Both numbers are required: a privacy setting is a choice, never a default."""

    clip_norm: float | Literal["off"] = Field(
        description="each client's update, all its tensors together, is scaled down to this "
        "L2 norm (the sensitivity of the round's sum); 'off' leaves updates as they are and "
        "then allows no noise")
    noise_multiplier: float = Field(
        ge=0, strict=True, allow_inf_nan=False, description="z: the noise added to the "
        "round's sum has standard deviation z × clip_norm per value (z × clip_norm / clients "
        "per round on the mean); 0 adds none and gives no guarantee")
    delta: float = Field(
        1e-5, gt=0, lt=1, strict=True, allow_inf_nan=False, description="the δ of the "
        "(ε, δ) reported each round; below 1 / data.num_clients")
    noise_seed: Literal["run", "secret"] = Field(
        "secret", description="where the noise comes from: 'secret' (the default: noise "
        "anyone can regenerate hides nothing) from 63 bits the server draws from the "
        "operating system and keeps in its checkpoint only (a resumed run is bit-identical, "
        "a fresh one is not); 'run' derives it from run.seed and the round (one seed "
        "reproduces the run bit for bit, for research: whoever knows or searches run.seed "
        "can subtract the noise)")
    accountant: Literal["rdp"] = Field(
        "rdp", description="how ε is computed: opacus' Rényi-DP accountant for the "
        "Poisson-subsampled Gaussian mechanism")

    @field_validator("clip_norm", mode="before")
    @classmethod
    def _off_or_positive(cls, value: Any) -> Any:
        if value == "off" or _positive_number(value):
            return value
        raise ValueError(f"must be 'off' or a positive number, got {value!r}")

    @model_validator(mode="after")
    def _noise_needs_clipping(self) -> PrivacySection:
        if self.noise_multiplier > 0 and self.clip_norm == "off":
            raise ValueError(
                f"noise_multiplier={self.noise_multiplier:g} with clip_norm = 'off': an "
                "unclipped update has no bound on its size, so no noise hides one client; "
                "set clip_norm to a number (e.g. 1.0)")
        return self

    @property
    def active(self) -> bool:
        """Whether the server clips (and may noise): with ``clip_norm = "off"`` (and so no
        noise) the section changes nothing, and the run is the plain one bit for bit."""
        return self.clip_norm != "off"

    def check_run(self, robust: RobustSection, num_clients: int) -> None:
        """Check the rest of the run against the guarantee, and set the ``[robust]`` keys
        it needs where the file leaves them unset. The analysis bounds one client's
        effect on the round's sum by ``clip_norm``: every client must weigh the same (a
        claimed sample count would scale its update past the bound) and combine by the
        mean (an order statistic's sensitivity is another analysis); ``robust.norm_bound``
        'auto' clips to a median of other clients' norms, so one client would change how
        the others are clipped, and ``clip_norm`` bounds every update already."""
        if self.delta >= 1 / num_clients:
            raise ValueError(
                f"privacy.delta={self.delta:g} is not below 1 / data.num_clients = "
                f"{1 / num_clients:.3g}: a mechanism that publishes one client's data "
                "outright meets such a δ; lower it (1e-5, or below 1 / clients)")
        if not self.active:
            return
        if robust.aggregator != "mean":
            raise ValueError(
                f"robust.aggregator = {robust.aggregator!r} with [privacy]: the noise is "
                "calibrated to the mean of clipped updates; use robust.aggregator = 'mean'")
        wanted = {"server_weighting": "uniform", "norm_bound": "off"}
        for key, value in wanted.items():
            if key not in robust.model_fields_set:
                setattr(robust, key, value)
            elif getattr(robust, key) != value:
                raise ValueError(
                    f"robust.{key} = {getattr(robust, key)!r} with [privacy]: the guarantee "
                    f"needs robust.{key} = {value!r} (privacy.clip_norm bounds each update, "
                    "every client weighs the same); set it so, or leave it unset")


def _positive_number(value: Any) -> bool:
    """A finite number above zero (a bool is not a number here)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


class Config(_Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    clients: ClientsSection = Field(default_factory=ClientsSection)
    method: MethodSection = Field(default_factory=MethodSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    robust: RobustSection = Field(default_factory=RobustSection)
    # None when the file has no [faults]: config.toml then stays as it was without it
    faults: FaultsSection | None = None
    # None when the file has no [privacy]: likewise
    privacy: PrivacySection | None = None

    @model_validator(mode="after")
    def _faults_simulated(self) -> Config:
        if self.faults is not None and self.runtime.kind != "simulation":
            raise ValueError(faults_refusal(self.runtime.kind))
        return self

    @model_validator(mode="after")
    def _cohort_fits(self) -> Config:
        per_round, n = self.clients.per_round, self.data.num_clients
        if per_round is not None and per_round > n:
            raise ValueError(f"clients.per_round={per_round} is more than data.num_clients={n}: "
                             f"a round samples at most {n} clients")
        return self

    @model_validator(mode="after")
    def _robust_fits_cohort(self) -> Config:
        self.robust.check_cohort(self.clients_per_round())
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> Config:
        if self.privacy is not None:
            self.privacy.check_run(self.robust, self.data.num_clients)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def clients_per_round(self) -> int:
        n = self.data.num_clients
        if self.clients.per_round is not None:
            return min(self.clients.per_round, n)
        if self.clients.fraction is not None:
            return max(1, round(self.clients.fraction * n))
        return n


def _describe(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = validation_message(e)
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            section_model = _section_model(e["loc"])
            if section_model is not None:
                msg += f" (allowed: {', '.join(sorted(section_model.model_fields))})"
        elif e["type"] == "literal_error" and "expected" in (e.get("ctx") or {}):
            msg = f"must be one of {e['ctx']['expected']}, got {e['input']!r}"
        lines.append(f"{origin}: {key}: {msg}" if key else f"{origin}: {msg}")
    return "\n".join(lines)


def validation_message(error: Any) -> str:
    """pydantic's message without its internals (a validator's own text, not
    ``Value error, ...``)."""
    if error["type"] == "value_error" and "error" in (error.get("ctx") or {}):
        return str(error["ctx"]["error"])
    return str(error["msg"])


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        # an optional section (``faults``) is its model or None
        kinds = (get_args(field.annotation) or (field.annotation,)) if field else ()
        sections = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if not sections:
            return None
        model = sections[0]
    return model


def parse_override(item: str) -> tuple[list[str], Any]:
    """``clients.lr=1e-3`` -> (['clients', 'lr'], 0.001). Values are TOML/Python literals,
    anything else is taken as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. clients.lr")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
    return path, value


def read_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (or the defaults when None), apply overrides and validate the
    structure; the method and model names are checked by :func:`fedbits.resolve.load_config`."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start}): is it a TOML "
                              "config?") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, origin)) from None
    return cfg


def dumps_toml(data: dict[str, Any]) -> str:
    """Write a two-level dict (sections of scalars and lists) as TOML."""
    out: list[str] = []
    for section, values in data.items():
        out.append(f"[{section}]")
        for key, value in values.items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters
    escaped, so any string round-trips through ``tomllib``."""
    if c in '"\\':
        return "\\" + c
    if ord(c) < 32 or ord(c) == 127:
        return f"\\u{ord(c):04x}"
    return c


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
