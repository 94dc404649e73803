"""Shared fixtures for the tests (helpers that start servers are in support.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import support
import tls_certs

from muxsrv.testing import FakeLoop


@pytest.fixture
def plugin_env() -> dict[str, str]:
    """``env=`` for running_server that makes the example plugins importable."""
    return support.plugin_env()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tls_certs.Certs:
    """A throwaway CA with server and client certificates (see tls_certs.py)."""
    return tls_certs.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def fake() -> Iterator[FakeLoop]:
    """The real loop on a fake selector and clock, for the UDP endpoint's tests."""
    f = FakeLoop()
    yield f
    f.close()


@pytest.fixture(autouse=True)
def _no_gevent_in_this_process() -> Iterator[None]:
    """Locust runs in processes of its own: importing it here would monkey-patch this
    process with gevent (sockets, os.read, fork) and break the tests after it."""
    yield
    assert "gevent" not in sys.modules, "this test imported Locust (gevent) into pytest's process"
