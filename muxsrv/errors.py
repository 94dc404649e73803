"""Errors a muxsrv peer reports, shared by the blocking client and outbound connections.

Plain exception classes with no imports, so that a handler module can name
them without pulling in the client or the loop.
"""

from __future__ import annotations

__all__ = ["ConnectionClosed", "ServerError"]


class ServerError(Exception):
    """The server answered with an error frame; ``message`` is its text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectionClosed(ConnectionError):
    """The server closed the connection before the expected reply."""
