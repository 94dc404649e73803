"""muxsrv: a single-threaded multiplexing TCP server with handler plugins.

One thread, one selector, non-blocking sockets; a sans-IO framing codec cuts
messages out of each connection's byte stream, a handler plugin answers them,
and replies leave through a per-connection output buffer.

The public API, all importable from here:

* for handler plugins: :class:`Handler` (subclass it), :class:`Conn` (what a
  handler sees of its connection), :class:`ConfigError` (refuse options), and
  the :class:`Timer` / :class:`Handle` that ``conn.loop.call_later`` /
  ``call_soon`` return;
* for clients: :class:`Client` and :class:`ServerError`;
* for tests: the module :mod:`muxsrv.testing` (``Harness`` and its fakes).

The package is typed (``py.typed``).  Importing it stays cheap: everything but
the handler interface is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .handler import ConfigError, Conn, Handler

if TYPE_CHECKING:
    from . import testing
    from .client import Client
    from .errors import ServerError
    from .loop import Handle, Timer

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ConfigError",
    "Conn",
    "Handle",
    "Handler",
    "ServerError",
    "Timer",
    "__version__",
    "testing",
]

# Imported on first use: the client and the loop pull in socket and selectors,
# testing the whole connection machinery; a handler module needs none of it.
_LAZY = {
    "Client": "client",
    "ServerError": "errors",
    "Handle": "loop",
    "Timer": "loop",
}


def __getattr__(name: str) -> object:
    if name == "testing":
        return importlib.import_module(".testing", __name__)
    if name in _LAZY:
        value: object = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
