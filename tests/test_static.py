"""The static checks are part of the suite: `mypy --strict` and `ruff` stay clean.

Catches an untyped or ill-typed change to the package, and lint (unused
imports, shadowed names, unsorted imports) anywhere in the tree.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import ROOT


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=280
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
