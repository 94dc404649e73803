"""muxsrv: a single-threaded multiplexing TCP server with handler plugins.

One thread, one selector, non-blocking sockets; a sans-IO framing codec cuts
messages out of each connection's byte stream, a handler plugin answers them,
and replies leave through a per-connection output buffer.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .handler import ConfigError, Conn, Handler

__all__ = ["ConfigError", "Conn", "Handler", "__version__"]
