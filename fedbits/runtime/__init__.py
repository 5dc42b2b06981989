"""Runtimes move payloads between a method's halves; the simulator is the default.

``runtime.kind = "flower"`` sends the same run to a Flower SuperLink instead (see
:mod:`fedbits.runtime.flower`); both runtimes share :func:`prepare_dir` and
:func:`execute`, so they leave the same run directory.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fedbits.config import Config
from fedbits.errors import ConfigError, FedbitsError

if TYPE_CHECKING:  # torch and the models load only when a run starts, not for `fedbits --help`
    from fedbits.runtime.simulation import RoundLoop


def _config_differences(saved: dict, current: dict) -> list[str]:
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) != ("run", "rounds") and a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def prepare_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Create (or check, to resume) ``cfg``'s run directory and save the config in it."""
    from fedbits.runtime.simulation import CHECKPOINT

    run_dir = cfg.run_dir
    config_path = run_dir / "config.toml"
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise FedbitsError(f"cannot resume: no checkpoint in {run_dir}")
        saved = tomllib.loads(config_path.read_text())
        current = tomllib.loads(cfg.to_toml())
        diffs = _config_differences(saved, current)
        if diffs:
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from the saved one "
                f"(only run.rounds may change): {'; '.join(diffs)}"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FedbitsError(
                f"run directory {run_dir} already exists: pass --resume to continue it, "
                "--overwrite to start again, or choose another run.name"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(cfg.to_toml())
    return run_dir


def execute(loop: RoundLoop, *, resume: bool = False) -> Path:
    """Run ``loop`` to its last round, then write the final model and the report."""
    first = loop.resume() if resume else 1
    loop.run(first)
    final = loop.run_dir / "final"
    loop.server.save_final(final)
    loop.setup.tokenizer.save_pretrained(final)
    from fedbits.report import write_report

    report = write_report(loop.run_dir)
    loop.log(f"done: final model in {final}, report in {report}")
    return loop.run_dir


def run_experiment(
    cfg: Config, *, resume: bool = False, overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) ``cfg`` end to end; return the run directory."""
    if cfg.runtime.kind == "flower":
        from fedbits.runtime.flower.launch import launch

        return launch(cfg, resume=resume, overwrite=overwrite, log=log)
    from fedbits.runtime.setup import prepare_run
    from fedbits.runtime.simulation import Simulation

    run_dir = prepare_dir(cfg, resume, overwrite)
    return execute(Simulation(prepare_run(cfg, log), run_dir, log), resume=resume)
