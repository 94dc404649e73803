"""The pytest plugin (entry point ``pytest11``): the ``muxsrv_server`` fixture.

pytest loads this module in every run of every virtual environment where
muxsrv is installed, so importing it costs nothing: the server machinery is
imported the first time a test asks for the fixture.  muxsrv itself never
imports this module, and does not depend on pytest.

    def test_reverse(muxsrv_server):
        srv = muxsrv_server("reverse:reverse", "--framing", "line")
        assert srv.client.request(b"stressed") == b"desserts"

``muxsrv_server(handler, *options)`` starts a real server (see
``muxsrv.threaded``: on a thread of the test process, on an ephemeral port)
and returns it with ``client`` connected; every server a test started is
stopped when that test ends, and a server that failed fails the test then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .client import Client
    from .threaded import ThreadedServer

__all__ = ["StartedServer", "muxsrv_server"]


class StartedServer:
    """What ``muxsrv_server(...)`` returns: the server's address and a connected client."""

    def __init__(self, server: ThreadedServer, client: Client) -> None:
        self.server = server
        self.client = client
        self.host, self.port = server.address
        self.address = server.address
        self.framing = server.framing

    def connect(self, **client_options: Any) -> Client:
        """Another Client to the same server (closed with it)."""
        return self.server.connect(**client_options)


@pytest.fixture
def muxsrv_server() -> Iterator[Callable[..., StartedServer]]:
    """A factory: ``muxsrv_server(handler, *options)`` -> StartedServer (see the module)."""
    from .threaded import ThreadedServer

    started: list[ThreadedServer] = []

    def start(handler: object, *options: str) -> StartedServer:
        server = ThreadedServer(handler, *options).start()
        started.append(server)
        return StartedServer(server, server.connect())

    yield start
    errors = []
    for server in reversed(started):
        try:
            server.stop()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
