"""A real muxsrv on a thread of the calling process: for tests of a handler.

``ThreadedServer(handler, *options)`` takes what ``python -m muxsrv`` takes (a
handler name or ``package.module:attribute``, and the same options, the
handler's own included), or the handler object itself: a function taking
the payload, or a ``muxsrv.Handler`` subclass.  ``start()`` listens on an
ephemeral port of 127.0.0.1 (unless ``--host``/``--port`` say otherwise) in
the calling thread, so a mistake raises there, then serves on a daemon
thread; ``stop()`` drains it as SIGTERM would and waits for the thread.

Why a thread and not a process: a handler object (a class defined in the
test module, a function closing over the test's state) can only be served
in-process; the server's log reaches the test's own logging (pytest's
``caplog``); and no interpreter has to start.  The price: a handler that
blocks or crashes the interpreter takes the test with it, and no signal
handlers are installed (the loop never sees SIGINT/SIGTERM; ``stop`` asks it
to drain through ``EventLoop.call_soon_threadsafe``).

The server itself is the same code as the command line's: ``cli.build_parser``
reads the options and ``Server`` serves; only ``--workers`` and
``--auth-token-file`` are refused.
"""

from __future__ import annotations

import contextlib
import io
import threading
from typing import Any

from . import cli, plugins
from .client import Client
from .handler import HandlerFactory, HandlerFunction
from .loop import EventLoop
from .server import DRAIN_GRACE, HANDLER_CLEANUP_TIMEOUT, Server

__all__ = ["ThreadedServer"]

#: Seconds beyond the drain's own bounds that ``stop`` waits for the thread.
STOP_MARGIN = 5.0


def _load(handler: object) -> plugins.LoadedPlugin:
    if isinstance(handler, str):
        return plugins.load(plugins.find(handler))
    name = getattr(handler, "__qualname__", type(handler).__name__)
    plugin = plugins.Plugin(name, f"{getattr(handler, '__module__', '?')}:{name}", "object")
    return plugins.LoadedPlugin(plugin, handler, plugins._validate(handler, f"handler {name!r}"))


def _parse(loaded: plugins.LoadedPlugin, options: tuple[str, ...]) -> Any:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            # Inside: a handler option that clashes with a core one exits too.
            parsed = cli.build_parser(loaded).parse_args(["--port", "0", *options])
    except SystemExit as exc:  # cli's own mistakes carry their line (``cli._Failed``)
        said = getattr(exc, "message", "") or err.getvalue().strip()
        raise ValueError(said or f"bad options {options!r}") from None
    if "--handler" in options or any(o.startswith("--handler=") for o in options):
        raise ValueError("give the handler as the first argument, not as --handler")
    if parsed.workers != 1:
        raise ValueError("--workers is for the command line: a threaded server is one loop")
    if parsed.auth_token_file is not None:
        raise ValueError("--auth-token-file is for the command line: the threaded server serves "
                         "its test unauthenticated, on loopback")
    return parsed


class ThreadedServer:
    """One server on its own thread; see the module docstring."""

    def __init__(self, handler: object, *options: str) -> None:
        loaded = _load(handler)
        parsed = _parse(loaded, options)
        function: HandlerFunction | None = None
        factory: HandlerFactory | None = None
        if loaded.form == "function":
            function = loaded.obj  # type: ignore[assignment]
        else:
            factory = loaded.handler_class.configure(parsed)
        self.settings = cli.settings_from(parsed, loaded.plugin.name)
        self.framing = self.settings.framing
        self._loop = EventLoop()
        self._server = Server(self._loop, self.settings, function=function, factory=factory,
                              gate=cli.gate_from(parsed))  # protected mode off loopback
        self._thread: threading.Thread | None = None
        self._clients: list[Client] = []
        self.error: BaseException | None = None  # what ended the server's thread, if anything
        self.host = ""
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> ThreadedServer:
        try:
            self.host, self.port = self._server.listen()[0][:2]
        except BaseException:
            self._loop.close()
            raise
        self._thread = threading.Thread(target=self._run, name=f"muxsrv:{self.port}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as exc:  # reported by stop(), in the test's thread
            self.error = exc
        finally:
            self._loop.close()

    def connect(self, **client_options: Any) -> Client:
        """A new Client to this server in its framing; closed by ``stop``."""
        client_options.setdefault("framing", self.framing)
        client = Client(self.host, self.port, **client_options)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        """Close the clients, drain the server, wait for its thread; raise if it failed."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        thread = self._thread
        if thread is None:
            self._loop.close()
            return
        if thread.is_alive():
            self._loop.call_soon_threadsafe(self._server.shutdown)
            thread.join(self.settings.drain_timeout + DRAIN_GRACE + HANDLER_CLEANUP_TIMEOUT
                        + STOP_MARGIN)
            if thread.is_alive():
                raise RuntimeError(f"muxsrv on port {self.port} did not stop")
        self._thread = None
        if self.error is not None:
            raise RuntimeError(f"muxsrv on port {self.port} failed: {self.error!r}") from self.error

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
