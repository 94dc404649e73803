"""The blocking client over UDP: ``Client(host, port, transport="udp")``.

Each message is one datagram and its reply one datagram (no framing: a
datagram is a message).  One request is in flight at a time: ``request``
sends, waits ``timeout`` seconds for the reply, and if none came (UDP loses
datagrams, and says nothing when it does) sends the same datagram again, up
to ``retries`` more times, then raises ``TimeoutError``.  The socket is
connected, so the kernel hands it only datagrams from the server's address,
and a server that is not there shows as ``ConnectionRefusedError`` (the ICMP
port-unreachable), where the system reports one.

What UDP cannot tell: whether a lost request or a lost reply made the retry
needed (a handler may see a message twice: make requests idempotent), and
whether a reply that arrives after the retry belongs to the first try.
Before each new request, replies left over from earlier ones are thrown
away, which is all a client with one request in flight can do; a handler
that needs more puts a request number in its messages.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from typing import Any

from .client import Client  # (which imports this module only when asked for UDP)
from .codec import Buffer
from .handlers.exec_protocol import ExecResult

__all__ = ["DEFAULT_RETRIES", "DEFAULT_UDP_TIMEOUT", "MAX_DATAGRAM", "UdpClient"]

#: The largest UDP payload over IPv4: 65,535 - 20 (IP header) - 8 (UDP header).
MAX_DATAGRAM = 65_507
#: Seconds to wait for each reply before sending again (a UDP round trip is short).
DEFAULT_UDP_TIMEOUT = 1.0
#: Sends after the first for a request that got no reply.
DEFAULT_RETRIES = 2


class UdpClient(Client):
    """One UDP socket to a muxsrv ``--udp`` server (not thread-safe); see the module doc.

    ``resent`` counts the datagrams sent again for lack of a reply.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9999,
        framing: str = "length",
        timeout: float | None = DEFAULT_UDP_TIMEOUT,
        max_frame: int = MAX_DATAGRAM,
        *,
        retries: int = DEFAULT_RETRIES,
        transport: str = "udp",
        connect_timeout: float | None = None,
        token: str | bytes | None = None,
        tls: Any = False,
        **_tcp_only: Any,
    ) -> None:
        if token is not None or tls:
            raise ValueError("UDP has no TLS and no token authentication: both need TCP")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.framing = "datagram"  # (framing does not apply: ``framing`` is ignored)
        self.timeout = timeout
        self.address = (host, port)
        self.retries = retries
        self.resent = 0
        self.reconnects = 0
        self._max_reply = max(max_frame, MAX_DATAGRAM)
        self._sock = self._open()

    def _open(self) -> socket.socket:
        host, port = self.address
        family, type_, proto, _name, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        return sock

    def close(self) -> None:
        self._sock.close()

    def abort(self) -> None:
        self._sock.close()

    def closed_by_server(self) -> str | None:
        """A datagram server closes nothing: None while this client's socket is open."""
        return "closed by this client" if self._sock.fileno() < 0 else None

    def reconnect(self) -> None:
        """A new socket (a new source port: late replies to the old one are lost)."""
        self._sock.close()
        self._sock = self._open()
        self.reconnects += 1

    def shutdown_write(self) -> None:
        raise OSError("UDP has no half-close")

    def encode(self, payload: Buffer) -> bytes:
        data = bytes(payload)
        if len(data) > MAX_DATAGRAM:
            raise ValueError(f"a datagram carries at most {MAX_DATAGRAM:,} bytes, "
                             f"not {len(data):,}")
        return data

    def send(self, payload: Buffer) -> None:
        """Send one datagram."""
        self._sock.send(self.encode(payload))

    def recv(self) -> bytes:
        """The next datagram from the server; TimeoutError after ``timeout``."""
        return self._sock.recv(self._max_reply)

    def request(self, payload: Buffer) -> bytes:
        """Send one datagram and return the reply, sending again after each ``timeout``
        with no reply, ``retries`` times; then TimeoutError."""
        data = self.encode(payload)
        self._discard_late()
        sock = self._sock
        for attempt in range(self.retries + 1):
            if attempt:
                self.resent += 1
            sock.send(data)
            with contextlib.suppress(TimeoutError):
                return sock.recv(self._max_reply)
        tries = self.retries + 1
        raise TimeoutError(f"no reply after {tries} {'try' if tries == 1 else 'tries'} of "
                           f"{self.timeout or 0:g} s")

    def pipeline(self, payloads: Iterable[Buffer]) -> list[bytes]:
        """One request after another (one in flight at a time over UDP)."""
        return [self.request(payload) for payload in payloads]

    def exec(self, command: str | Buffer) -> ExecResult:
        raise ValueError("exec refuses UDP: a forged source address would run commands "
                         "for someone else")

    def _discard_late(self) -> None:
        sock = self._sock
        sock.setblocking(False)
        try:
            with contextlib.suppress(BlockingIOError, InterruptedError, ConnectionRefusedError):
                while True:
                    sock.recv(self._max_reply)
        finally:
            sock.settimeout(self.timeout)
