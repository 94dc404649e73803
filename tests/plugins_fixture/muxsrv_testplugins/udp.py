"""Handlers for the UDP tests: per-peer state, the token echo that validates a peer."""

from __future__ import annotations

import logging
import secrets

from muxsrv import Conn, Handler

log = logging.getLogger("muxsrv.testplugins")


class Counter(Handler):
    """Replies ``N payload``: N counts this instance's datagrams (one instance per peer)."""

    def connection_made(self, conn: Conn) -> None:
        self.count = 0
        log.warning("made %r", conn.peer)

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self.count += 1
        conn.send(b"%d %s" % (self.count, payload))

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        log.warning("lost %r", conn.peer)


class TokenEcho(Handler):
    """The README's example: prove your address by echoing a token, then ask for more.

    ``HELLO`` -> a 12-byte token; ``TOKEN <it>`` -> ``OK`` and the peer is
    validated; ``SIZE n`` -> n bytes (dropped by the server while the reply is
    over 3 times the request and the peer is not validated).
    """

    def connection_made(self, conn: Conn) -> None:
        self.token = secrets.token_urlsafe(9).encode()  # 12 bytes: fits 3x "HELLO"

    def message_received(self, conn: Conn, payload: bytes) -> None:
        if payload == b"HELLO":
            conn.send(self.token)
        elif payload == b"TOKEN " + self.token:
            conn.peer_validated()
            conn.send(b"OK")
        elif payload.startswith(b"SIZE "):
            conn.send(b"x" * int(payload[5:]))
        else:
            conn.send(b"?")


def triple(payload: bytes) -> bytes:
    """Three times the datagram: as large as an unvalidated reply may be."""
    return payload * 3


def quadruple(payload: bytes) -> bytes:
    """Four times the datagram: over the amplification cap."""
    return payload * 4


def unsafe(payload: bytes) -> bytes:
    """A function handler that declares itself unsafe over UDP."""
    return payload


unsafe.udp_unsafe = "it trusts the source address"  # type: ignore[attr-defined]
