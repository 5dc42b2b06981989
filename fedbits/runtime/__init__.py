"""Runtimes move payloads between a method's halves; the simulator is the default."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Callable

from fedbits.config import Config
from fedbits.errors import ConfigError, FedbitsError
from fedbits.runtime.setup import prepare_run
from fedbits.runtime.simulation import CHECKPOINT, Simulation


def _config_differences(saved: dict, current: dict) -> list[str]:
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) != ("run", "rounds") and a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def _prepare_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
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


def run_experiment(
    cfg: Config, *, resume: bool = False, overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) ``cfg`` end to end; return the run directory."""
    if cfg.runtime.kind != "simulation":
        raise ConfigError(f"runtime.kind {cfg.runtime.kind!r} is not available in this build")
    run_dir = _prepare_dir(cfg, resume, overwrite)
    setup = prepare_run(cfg, log)
    sim = Simulation(setup, run_dir, log)
    first = sim.resume() if resume else 1
    sim.run(first)
    final = run_dir / "final"
    sim.server.save_final(final)
    setup.tokenizer.save_pretrained(final)
    from fedbits.report import write_report

    report = write_report(run_dir)
    log(f"done: final model in {final}, report in {report}")
    return run_dir
