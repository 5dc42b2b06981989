"""The linters run by the test command: ruff (style, imports, likely bugs) over the whole
tree and mypy over the package, both configured in pyproject.toml and clean."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.lint


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_ruff_is_clean():
    proc = _run("ruff", "check", "fedbits", "bench", "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean():
    proc = _run("mypy")  # the files and settings are [tool.mypy]'s
    assert proc.returncode == 0, proc.stdout + proc.stderr
