"""Runtimes move payloads between a method's halves; the simulator is the default.

``runtime.kind = "flower"`` sends the same run to a Flower SuperLink instead (see
:mod:`fedbits.runtime.flower`); both runtimes share :func:`check_run_dir`,
:func:`open_run_dir` and :func:`execute`, so they leave the same run directory.

A start is two-phase so that a bad input never costs a user their old run: first
everything is checked and built (:func:`check_run_dir` writes nothing, then the model,
data and method are built), and only then :func:`open_run_dir` replaces an old run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from fedbits.config import Config
from fedbits.errors import ConfigError, FedbitsError
from fedbits.resolve import config_toml, resolved

if TYPE_CHECKING:  # torch and the models load only when a run starts, not for `fedbits --help`
    from fedbits.runtime.loop import RoundLoop

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
RUN_FILES = frozenset({
    CONFIG_FILE, "metrics.jsonl", "ledger.jsonl", "checkpoints", "client_store", "final",
    "report.md", "flower.json", "holders.json",
})
"""What fedbits writes in a run directory (plus plots, ``*.png``): ``--overwrite``
removes a directory only when it holds nothing else."""


def _config_differences(saved: dict, current: dict) -> list[str]:
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) != ("run", "rounds") and a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def _foreign_entries(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` that fedbits does not write there."""
    return sorted(
        p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and p.suffix != ".png"
    )


def _saved_config(run_dir: Path) -> dict:
    path = run_dir / CONFIG_FILE
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedbitsError(f"cannot resume {run_dir}: it holds no {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FedbitsError(f"cannot resume {run_dir}: {path} is unreadable: {e}") from None


def check_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Check that ``cfg``'s run directory can be started, resumed or replaced; write nothing.

    ``run.name`` is validated by the config (one directory name, no separators), so the
    run directory is always a direct child of ``run.out_dir``.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the "
                          "run, --overwrite deletes it and starts again")
    out_dir = Path(cfg.run.out_dir).expanduser().absolute()
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"run.out_dir: {cfg.run.out_dir} cannot hold runs: {existing} is "
                          "not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.out_dir: {cfg.run.out_dir} cannot be written ({existing} is "
                          "not writable)")
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} exists and is not a directory "
                          "(choose another run.name)")
    if resume:
        if not run_dir.is_dir():
            raise FedbitsError(f"cannot resume: {run_dir} does not exist")
        diffs = _config_differences(_saved_config(run_dir), resolved(cfg))
        if diffs:
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from the saved one "
                f"(only run.rounds may grow): {'; '.join(diffs)}"
            )
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise FedbitsError(
                f"run directory {run_dir} already exists: pass --resume to continue it, "
                "--overwrite to start again, or choose another run.name"
            )
        foreign = _foreign_entries(run_dir)
        if foreign or not (run_dir / CONFIG_FILE).is_file():
            raise FedbitsError(
                f"--overwrite refused: {run_dir} does not hold a fedbits run "
                f"(unexpected: {', '.join(foreign[:5]) or f'no {CONFIG_FILE}'}); "
                "move it away or choose another run.name"
            )
    return run_dir


def open_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """Create the run directory (replacing an old run on ``overwrite``) once everything has
    been built; a fresh run's config is saved now, a resumed one's after its checkpoint
    is read (:func:`execute`), since only then is ``run.rounds`` known to be allowed."""
    run_dir = check_run_dir(cfg, resume, overwrite)
    try:
        if overwrite and run_dir.is_dir():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(cfg, run_dir)
    except OSError as e:
        raise FedbitsError(f"cannot create run directory {run_dir}: {e}") from None
    return run_dir


def save_config(cfg: Config, run_dir: Path) -> None:
    """Write the resolved configuration (every default, method options included)."""
    (run_dir / CONFIG_FILE).write_text(config_toml(cfg), encoding="utf-8")


def execute(loop: RoundLoop, *, resume: bool = False) -> Path:
    """Run ``loop`` to its last round, then write the final model and the report.

    Raises :class:`~fedbits.errors.NoUpdateAccepted` (after writing the report) when no
    client update was accepted in any round: an untrained model is not a success.
    """
    first = loop.resume() if resume else 0
    if resume:
        save_config(loop.cfg, loop.run_dir)
    loop.run(first)
    final = loop.run_dir / "final"
    loop.server.save_final(final)
    loop.setup.tokenizer.save_pretrained(final)
    from fedbits.report import write_report

    report = write_report(loop.run_dir)
    logger.info("done: final model in %s, report in %s", final, report)
    loop.raise_if_nothing_accepted()
    return loop.run_dir


def run_experiment(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run (or resume) ``cfg`` end to end; return the run directory. Progress goes to
    the ``fedbits`` loggers (:mod:`fedbits.logs` shows it as the command line does)."""
    if cfg.runtime.kind == "flower":
        from fedbits.runtime.flower.launch import launch

        return launch(cfg, resume=resume, overwrite=overwrite)
    from fedbits.runtime.setup import prepare_run
    from fedbits.runtime.simulation import Simulation

    run_dir = check_run_dir(cfg, resume, overwrite)
    loop = Simulation(prepare_run(cfg), run_dir)  # builds everything, writes nothing
    open_run_dir(cfg, resume, overwrite)
    return execute(loop, resume=resume)
