"""``--proxy-protocol``: who may send a PROXY header, and how long it may take.

A :class:`Proxying` holds a server's PROXY protocol settings, shared by its
connections, as :class:`~muxsrv.auth.Gate` holds authentication's:

* ``trusts(peer)``: the socket's peer is in ``--proxy-from`` (by default
  loopback only).  A connection from anywhere else is closed at accept,
  before a byte is read: only a balancer may name a client;
* ``stage(peer, refusal)``: the :class:`~muxsrv.stages.proxy.ProxyHeader` a
  connection starts with, nearest the socket.  With PROXY on, protected mode
  and the brute-force lock-out are decided when the header has been read, on
  the address it carries (``refusal``), not at accept on the balancer's;
* ``arm``/``forget``: a header not complete within ``timeout`` seconds closes
  its connection (logged with the socket's address), as the auth gate's timer
  does.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any, Final

from .address import format_address
from .stages.proxy import PROXY_TIMEOUT, ProxyHeader

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .connection import Connection
    from .loop import EventLoop, Timer

__all__ = ["DEFAULT_PROXY_FROM", "HEADER_TIMEOUT", "Network", "Proxying", "parse_networks"]

log = logging.getLogger("muxsrv.proxy")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Who may send a header unless told otherwise: a balancer on this host.
DEFAULT_PROXY_FROM: Final = "127.0.0.0/8,::1/128"
HEADER_TIMEOUT: Final = "no complete PROXY protocol header"


def parse_networks(text: str) -> tuple[Network, ...]:
    """``CIDR[,CIDR...]`` as networks; ValueError naming the one that is not."""
    networks = []
    for part in text.split(","):
        part = part.strip()
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not an address or a network (CIDR)") from None
    return tuple(networks)


class Proxying:
    """A server's PROXY protocol settings and its connections' header timers."""

    def __init__(self, trusted: Sequence[Network] | None = None,
                 timeout: float = PROXY_TIMEOUT) -> None:
        self.trusted = tuple(trusted) if trusted is not None else parse_networks(
            DEFAULT_PROXY_FROM)
        self.timeout = timeout
        self._timers: dict[Connection, Timer] = {}

    def trusts(self, peer: Any) -> bool:
        """May ``peer`` (the socket's) send a PROXY header?"""
        if not isinstance(peer, tuple):
            return True  # a Unix socket: whoever may open it is on this host
        try:
            address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def stage(self, peer: Any, refusal: Callable[[Any], str | None] | None) -> ProxyHeader:
        """The header parser a new connection from ``peer`` starts with."""
        return ProxyHeader(peer, refusal)

    def arm(self, loop: EventLoop, conn: Connection, stage: ProxyHeader) -> None:
        """Close ``conn`` if its header is not complete within the timeout."""
        if self.timeout > 0:
            stage.timer = self._timers[conn] = loop.call_later(
                self.timeout, _expire, conn, stage, self.timeout)

    def forget(self, conn: Connection) -> None:
        """``conn`` closed: cancel its timer."""
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()


def _expire(conn: Connection, stage: ProxyHeader, timeout: float) -> None:
    if not (stage.done or stage.error is not None or conn.closing):
        log.warning("closing %s: %s within %g s", format_address(conn.peer), HEADER_TIMEOUT,
                    timeout, extra={"peer": format_address(conn.peer)})
        stage.error = HEADER_TIMEOUT  # nothing more passes
        conn.close()
