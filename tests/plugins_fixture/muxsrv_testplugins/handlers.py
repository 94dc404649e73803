"""Example handlers in both forms, each written to make one server behaviour visible.

Handlers that need to show the test what they saw log it at WARNING level (the
server's stderr is the test's view into the process).
"""

from __future__ import annotations

import argparse
import functools
import logging

from muxsrv import ConfigError, Conn, Handler
from muxsrv.handler import HandlerFactory

log = logging.getLogger("muxsrv.testplugins")


# -- the function form ------------------------------------------------------


def reverse(payload: bytes) -> bytes:
    return payload[::-1]


def quiet(payload: bytes) -> bytes | None:
    """No reply to messages starting with b"quiet"; echo the rest."""
    return None if payload.startswith(b"quiet") else payload


def boom(payload: bytes) -> bytes:
    """Raise on messages starting with b"boom"; echo the rest."""
    if payload.startswith(b"boom"):
        raise ValueError(f"kaboom on {payload!r}")
    return payload


def wrong_type(payload: bytes) -> str:
    """Returns str, not bytes: the server must treat it as a handler error."""
    return payload.decode()


def recorder(payload: bytes) -> bytes:
    """Echo, logging every payload the handler is given (its size and start)."""
    log.warning("handler got %d bytes: %r", len(payload), payload[:32])
    return payload


def two_args(payload: bytes, extra: bytes) -> bytes:
    """Wrong signature for a function handler."""
    return payload + extra


NOT_CALLABLE = 42


class NotAHandler:
    """Has the methods of a handler but does not subclass muxsrv.Handler."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.send(payload)


# -- the class form -----------------------------------------------------------


class Tracer(Handler):
    """Records every call; b"trace" replies with the record, and so does EOF.

    connection_lost logs the whole record, so the test can check the order
    made -> message* -> eof -> lost, once per connection.
    """

    count = 0

    def __init__(self) -> None:
        Tracer.count += 1
        self.number = Tracer.count
        self.events: list[str] = []

    def _record(self) -> bytes:
        return f"#{self.number} {' '.join(self.events)}".encode()

    def connection_made(self, conn: Conn) -> None:
        self.events.append("made")

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self.events.append("message:" + payload.decode())
        conn.send(self._record() if payload == b"trace" else payload)

    def eof_received(self, conn: Conn) -> None:
        self.events.append("eof")
        log.warning("eof received by tracer #%d", self.number)
        conn.send(self._record())

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        self.events.append("lost")
        log.warning("tracer %s", self._record().decode())


class RaisingClass(Handler):
    """The class form of ``boom``."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.send(boom(payload))


class Deferred(Handler):
    """Replies after --deferred-delay seconds, holding the connection busy meanwhile."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--deferred-delay", type=float, default=0.5)

    @classmethod
    def configure(cls, options: argparse.Namespace) -> HandlerFactory:
        if options.deferred_delay < 0:
            raise ConfigError("--deferred-delay must not be negative")
        return functools.partial(cls, options.deferred_delay)

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.work_started()
        log.warning("deferred got %r", payload)
        conn.loop.call_later(self.delay, self._reply, conn, payload)

    def _reply(self, conn: Conn, payload: bytes) -> None:
        conn.send(payload)
        conn.work_done()


class Pauser(Handler):
    """b"pause" pauses reading for 0.3 s (b"pause-long": 30 s); a message handed over
    meanwhile is answered as a leak."""

    def __init__(self) -> None:
        self.paused = False

    def message_received(self, conn: Conn, payload: bytes) -> None:
        if self.paused:
            log.error("message while paused: %r", payload)
            conn.send(b"LEAK:" + payload)
        elif payload in (b"pause", b"pause-long"):
            self.paused = True
            conn.pause_reading()
            conn.loop.call_later(0.3 if payload == b"pause" else 30, self._resume, conn)
            conn.send(b"paused")
        else:
            conn.send(payload)

    def _resume(self, conn: Conn) -> None:
        self.paused = False
        conn.resume_reading()


class FailsOnConnect(Handler):
    """connection_made raises: that connection ends, the server goes on."""

    def connection_made(self, conn: Conn) -> None:
        raise RuntimeError("cannot greet")


class FailsOnLost(Handler):
    """Echo; connection_lost raises (logged, nothing else)."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.send(payload)

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        raise RuntimeError("cannot say goodbye")


class FactoryFails(Handler):
    """configure returns a factory that raises for every connection."""

    @classmethod
    def configure(cls, options: argparse.Namespace) -> HandlerFactory:
        def factory() -> Handler:
            raise RuntimeError("no handler for you")

        return factory


class Clash(Handler):
    """Declares an option the core already has."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--port", type=int)


class ConfigureCrashes(Handler):
    """configure fails with something other than ConfigError."""

    @classmethod
    def configure(cls, options: argparse.Namespace) -> HandlerFactory:
        raise KeyError("missing-setting")


class PeerCert(Handler):
    """Answers every message with the commonName of the client's verified certificate."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        cert = conn.peer_cert
        if cert is None:
            conn.send(b"no certificate")
            return
        names = [value for rdn in cert["subject"] for key, value in rdn if key == "commonName"]
        conn.send(",".join(names).encode())


class Peers(Handler):
    """Echoes; ``peer?`` is answered with ``repr(conn.peer)``, and logged (PROXY tests)."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        if payload == b"peer?":
            log.warning("peer: %r", conn.peer)
            conn.send(repr(conn.peer).encode())
        else:
            conn.send(payload)
