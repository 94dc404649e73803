"""Binding a port on every address a host resolves to: the server's and the supervisor's.

``bind_sockets`` is the one place that binds: a host name resolving to
several addresses (``localhost``: 127.0.0.1 and ::1) gets a socket on each,
all on the same port (port 0: the first one's, chosen by the kernel), IPv6
sockets IPv6-only so that the IPv4 one can share the port.  A failure is a
:class:`CannotListen` naming the address, and tells a user's mistake (a port
in use, a name that does not resolve) from a refusal by the system.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from .address import format_address

__all__ = ["CannotListen", "bind_addresses", "bind_sockets"]


class CannotListen(OSError):
    """Binding or listening failed; ``str()`` names the address and the reason.

    ``mistake``: the address asked for cannot be had as given (the port is in
    use, the host name does not resolve), rather than refused by the system.
    """

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.address = format_address((host, port))
        self.mistake = isinstance(cause, socket.gaierror) or cause.errno == errno.EADDRINUSE

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.strerror}"


def bind_addresses(
    host: str, port: int, kind: int = socket.SOCK_STREAM
) -> list[tuple[int, int, int, tuple[Any, ...]]]:
    """``(family, type, proto, sockaddr)`` for each address ``host`` resolves to, once each.

    Raises OSError (``socket.gaierror`` if the name does not resolve).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    except UnicodeError:  # "a..b", a label over 63 characters: no name at all (IDNA)
        raise socket.gaierror(socket.EAI_NONAME, "not a valid host name") from None
    seen = set()
    found = []
    for family, type_, proto, _name, addr in infos:
        if (family, addr[0]) not in seen:
            seen.add((family, addr[0]))
            found.append((int(family), int(type_), proto, tuple(addr)))
    return found


def bind_sockets(
    host: str, port: int, reuse_port: bool, then: Callable[[socket.socket], object],
    kind: int = socket.SOCK_STREAM,
) -> list[socket.socket]:
    """A socket bound on every address ``host`` resolves to, all on one port (port 0:
    the first's), ``then`` called on each after its bind; on OSError all are closed.
    ``kind``: ``SOCK_STREAM``, or ``SOCK_DGRAM`` for the UDP endpoint."""
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, addr in bind_addresses(host, port, kind):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            if kind == socket.SOCK_STREAM:
                # (Not for UDP: there, Linux lets a second socket share the port and
                # steal its datagrams when both set it.)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr[0], port, *addr[2:]))
            port = sock.getsockname()[1]
            then(sock)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
