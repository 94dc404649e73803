"""Shared fixtures for the tests (helpers that start servers are in support.py)."""

from __future__ import annotations

import pytest
import support


@pytest.fixture
def plugin_env() -> dict[str, str]:
    """``env=`` for running_server that makes the example plugins importable."""
    return support.plugin_env()
