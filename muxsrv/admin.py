"""The admin listener (``--admin-port``): a tiny HTTP/1.0 responder on the server's own loop.

Routes: ``GET /metrics`` (Prometheus text 0.0.4), ``GET /stats`` (JSON),
``GET /clients`` (a JSON list, one object per connection), ``GET /healthz``
(``200 ok`` while serving, ``503 draining`` during the drain: the admin
listener stays open until the server exits).  Anything else is 404, a method
other than GET 405.  One request per connection, then a lingering close.

Nothing here may stall the loop or grow without bound: a request head is at
most ``httphead.MAX_HEAD`` bytes and must be complete within ``HEAD_TIMEOUT``
(else the connection is refused and closed); at most ``MAX_ADMIN`` admin
connections at once; a whole response must be taken within
``RESPONSE_TIMEOUT``.  ``/clients`` is written ``CLIENTS_PER_TURN``
connections per loop turn, and only while less than ``CLIENTS_PENDING`` bytes
of it wait for the reader: a slow reader holds one bounded buffer and costs
the data path nothing.  With a token file (``--auth-token-file``), every
request needs ``Authorization: Bearer <token>`` (compared in constant time).

Admin connections have their own counters (``stats.admin_*``) and are never
among the server's connections.  Where the numbers come from is a
:class:`Source`: one server's (``LocalSource``), or with ``--workers`` all
the workers' (``muxsrv.workerstats``).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, Protocol

from .httphead import BadRequest, HeadReader, Request, response
from .loop import EVENT_READ
from .promtext import CONTENT_TYPE, render
from .transport import EOF, OPEN, RECV_SIZE, Transport

if TYPE_CHECKING:
    from .auth import Tokens
    from .loop import EventLoop, Timer
    from .server import Server

__all__ = ["AdminServer", "LocalSource", "Source", "Wait"]

log = logging.getLogger("muxsrv")

#: A request head must be complete this long after the connection was accepted.
HEAD_TIMEOUT: Final = 5.0
#: A response must be taken by the reader within this (a /clients of 100,000 takes ~2 s).
RESPONSE_TIMEOUT: Final = 60.0
#: Admin connections open at once; more are closed at once.
MAX_ADMIN: Final = 32
#: /clients: connections described per loop turn (about a millisecond of work) ...
CLIENTS_PER_TURN: Final = 200
#: ... while less than this much of the response waits for the reader.
CLIENTS_PENDING: Final = 64 * 1024
JSON: Final = "application/json"


class Wait:
    """What a /clients iterator yields while the next items are not there yet (another
    worker's, on their way): the callback given to ``on_ready`` is called once they are."""

    __slots__ = ("_callback",)

    def __init__(self) -> None:
        self._callback: Any = None

    def on_ready(self, callback: Any) -> None:
        self._callback = callback

    def ready(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class Source(Protocol):
    """Where the admin listener's numbers come from."""

    @property
    def draining(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    def metrics(self) -> str: ...

    def clients(self) -> Iterator[dict[str, Any] | Wait]: ...


class LocalSource:
    """One server's numbers."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def draining(self) -> bool:
        return self.server.draining

    def stats(self, fine: bool = False) -> dict[str, Any]:
        server = self.server
        return server.stats.snapshot(server.connections(), server.draining, fine)

    def metrics(self) -> str:
        stats = self.server.stats
        return render(self.stats(), {stats.handler: stats.latency})

    def clients(self) -> Iterator[dict[str, Any]]:
        server = self.server
        handler = server.stats.handler
        loop = server.loop
        for conn in list(server.connections()):
            if not conn.closing:
                yield conn.describe(loop.now, handler)


class AdminServer:
    """The admin listening socket and its connections."""

    def __init__(self, loop: EventLoop, source: Source, stats: Any,
                 tokens: Tokens | None = None) -> None:
        self.loop = loop
        self.source = source
        self.stats = stats  # .admin_accepted, .admin_current, .admin_refused
        self.tokens = tokens
        self.sock: socket.socket | None = None
        self.conns: set[AdminConnection] = set()
        #: With --workers: what writes this worker's numbers for the others.
        self.publisher: Any = None

    def listen(self, host: str, port: int, sock: socket.socket | None = None) -> Any:
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(64)
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        self.sock = sock
        self.loop.register(sock, EVENT_READ, self)
        return sock.getsockname()

    def handle_event(self, mask: int) -> None:
        assert self.sock is not None
        for _ in range(16):
            try:
                conn, _peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("admin accept failed: %s", exc.strerror)
                return
            if len(self.conns) >= MAX_ADMIN:
                self.stats.admin_refused += 1
                conn.close()
                continue
            conn.setblocking(False)
            admin = AdminConnection(self, conn)
            self.conns.add(admin)
            self.stats.admin_accepted += 1
            self.stats.admin_current += 1
            admin.start()

    def closed(self, conn: AdminConnection) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            self.stats.admin_current -= 1

    def close(self) -> None:
        if self.sock is not None:
            self.loop.unregister(self.sock)
            self.sock.close()
            self.sock = None
        for conn in list(self.conns):
            conn.abort()


class AdminConnection(Transport):
    """One admin request: read the head, answer, close."""

    __slots__ = ("_clients", "_deadline", "_first", "_reader", "_server", "_waiting")

    def __init__(self, server: AdminServer, sock: socket.socket) -> None:
        super().__init__(server.loop, sock, None)
        self._server = server
        self._reader: HeadReader | None = HeadReader()
        self._clients: Iterator[dict[str, Any] | Wait] | None = None
        self._waiting = False
        self._first = True
        self._deadline: Timer | None = None

    def start(self) -> None:
        self._update_mask()
        self._deadline = self._loop.call_later(HEAD_TIMEOUT, self._timed_out)

    def handle_event(self, mask: int) -> None:
        if not mask & EVENT_READ:
            self._flush()
            return
        if self._state != OPEN or self._reader is None:
            self._discard_input()
            self._flush()
            return
        try:
            data = self._sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc, "admin recv")
            return
        if not data:
            self._flags |= EOF
            self._close(None)
            return
        verdict = self._reader.feed(data)
        if verdict is not None:
            self._reader = None
            self._update_mask()
            self._answer(verdict)

    def _wants_input(self) -> bool:
        return self._reader is not None

    def _timed_out(self) -> None:
        if self._reader is not None:  # the head is not complete yet
            self._reader = None
            self._reply(response(408, b"request head not complete in time\n"))
        else:  # the response is not taken yet
            self.abort()

    def _answer(self, verdict: Request | BadRequest) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._loop.call_later(RESPONSE_TIMEOUT, self._timed_out)
        if isinstance(verdict, BadRequest):
            self._reply(response(verdict.status, verdict.why.encode() + b"\n"))
            return
        tokens = self._server.tokens
        if tokens is not None:
            scheme, _, token = verdict.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not tokens.accepts(token.strip().encode()):
                self._reply(response(401, b"a token is needed: Authorization: Bearer <token>\n",
                                     extra=(("WWW-Authenticate", 'Bearer realm="muxsrv"'),)))
                return
        if verdict.method != "GET":
            self._reply(response(405, b"only GET\n", extra=(("Allow", "GET"),)))
            return
        source = self._server.source
        path = verdict.path
        try:
            if path == "/metrics":
                self._reply(response(200, source.metrics().encode(), CONTENT_TYPE))
            elif path == "/stats":
                body = json.dumps(source.stats(), indent=1).encode() + b"\n"
                self._reply(response(200, body, JSON))
            elif path == "/healthz":
                self._reply(response(503, b"draining\n") if source.draining
                            else response(200, b"ok\n"))
            elif path == "/clients":
                self._start_clients(source.clients())
            else:
                self._reply(response(404, b"not found: /metrics, /stats, /clients, /healthz\n"))
        except Exception:
            log.exception("admin: %s failed", path)
            self._reply(response(500, b"internal error; see the server log\n"))

    def _reply(self, data: bytes) -> None:
        self._out = [data]
        self.close()

    def _start_clients(self, clients: Iterator[dict[str, Any] | Wait]) -> None:
        head = ("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                "Cache-Control: no-store\r\n\r\n[")
        self._out = [head.encode()]
        self._clients = clients
        self._flush()
        self._loop.call_soon(self._more_clients)

    def _more_clients(self) -> None:
        clients = self._clients
        if clients is None or self._state != OPEN:
            return
        if self.pending >= CLIENTS_PENDING:
            self._waiting = True  # until the reader has taken it: _maybe_finish
            return
        parts = []
        waiting = False
        for _ in range(CLIENTS_PER_TURN):
            item = next(clients, None)
            if item is None:
                self._clients = None
                break
            if isinstance(item, Wait):  # another worker's, not there yet
                item.on_ready(self._wake)
                waiting = True
                break
            parts.append(("\n" if self._first else ",\n") + json.dumps(item))
            self._first = False
        if self._clients is None:
            parts.append("\n]\n")
        self._out = ["".join(parts).encode()]
        if self._clients is None:
            self.close()
        else:
            self._flush()
            if not waiting:
                self._loop.call_soon(self._more_clients)

    def _wake(self) -> None:
        self._loop.call_soon(self._more_clients)

    def _maybe_finish(self) -> None:
        if self._waiting:
            self._waiting = False
            self._loop.call_soon(self._more_clients)

    def _closed(self, exc: BaseException | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        clients, self._clients = self._clients, None
        close = getattr(clients, "close", None)
        if close is not None:
            close()  # (a generator: its relays close)
        self._server.closed(self)
