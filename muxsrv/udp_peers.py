"""UDP peers: what a class handler sees of one peer address, and the table of them.

No sockets here (``muxsrv.udp`` reads and sends): datagrams come in as
``(address, payload)``, replies go out through :class:`Route`.

A class handler gets one instance per peer address, made on the first
datagram from it (``connection_made``, then ``message_received`` for that
datagram and every later one).  There is no connection to end, so an
instance ends (``connection_lost(conn, None)``, from the loop) when

* the peer was silent for ``--idle-timeout`` (since its last datagram or
  ``work_done``; never while a ``work_started`` waits for its ``work_done``),
  checked by a sweep, ~1/8 of the timeout late;
* the table holds ``--udp-max-peers`` instances and a new address sends: the
  least recently active one goes first (an LRU: the table is ordered by
  activity, so both the sweep and the eviction look only at its front);
* the handler called ``conn.close()`` or ``conn.abort()`` (the next datagram
  from that address makes a fresh instance);
* the server stops.

Amplification (QUIC's rule): until the handler calls ``conn.peer_validated()``
a peer may be sent at most 3 times the size of its latest datagram, in all, until
its next one; a reply beyond that is dropped and logged.  A source address can
be forged, so without the rule a 40-byte request could aim a large reply at
someone else.  ``peer_validated`` is meant for a handler that sent the peer a
token it could only echo back if the address is really its own.

A handler that raises in ``message_received`` has that datagram's replies
(those sent inside the call) dropped; the error is logged and the instance
goes on.  ``pause_reading`` drops the peer's datagrams until
``resume_reading`` (UDP may lose them anyway; holding them would be memory a
flood could fill).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from .address import format_address
from .ratelog import RateLimitedLog

if TYPE_CHECKING:
    from .codec import Buffer
    from .handler import Handler, HandlerFactory, PeerAddress
    from .loop import EventLoop, Timer

__all__ = ["AMPLIFICATION", "DatagramPeer", "PeerTable", "Route"]

log = logging.getLogger("muxsrv.udp")

#: A peer not validated gets at most this many times its latest datagram's size in replies.
AMPLIFICATION: Final = 3


class Route(Protocol):
    """Where a peer's replies go: the endpoint's socket the datagram came in on."""

    def reply(self, peer: DatagramPeer, data: bytes) -> None: ...


class DatagramPeer:
    """The ``conn`` of one UDP peer address (a :class:`~muxsrv.handler.Conn`)."""

    __slots__ = ("_closing", "_held", "_paused", "_table", "_work", "address", "allowance",
                 "handler", "last_active", "route", "validated")

    def __init__(self, table: PeerTable, address: Any, route: Route, now: float) -> None:
        self._table = table
        self.address = address
        self.route = route
        self.handler: Handler | None = None
        self.last_active = now
        #: Bytes the peer may still be sent before it is validated.
        self.allowance = 0
        self.validated = False
        self._closing = False
        self._paused = False
        self._work = 0
        #: Replies sent inside a callback, delivered when it returns (dropped if it raised).
        self._held: list[bytes] | None = None

    # -- the Conn API --------------------------------------------------------

    @property
    def peer(self) -> PeerAddress | None:
        return self.address  # type: ignore[no-any-return]

    @property
    def peer_cert(self) -> dict[str, Any] | None:
        return None

    @property
    def loop(self) -> EventLoop:
        return self._table.loop

    @property
    def framing(self) -> str:
        return "datagram"

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, payload: Buffer, *more: Buffer) -> None:
        if self._closing:
            return
        data = b"".join((payload, *more))  # TypeError for what is not bytes-like
        if self._held is not None:
            self._held.append(data)
        else:
            self.route.reply(self, data)

    def send_error(self, text: str) -> None:
        self._table.quiet_log.warning("UDP %s: error not sent (datagrams have no error frame): "
                                      "%s", _shown(self.address), text, peer=self.address)

    def close(self) -> None:
        self._table.drop_soon(self)

    def abort(self) -> None:
        self._held = None if self._held is None else []
        self._table.drop_soon(self)

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False

    def work_started(self) -> None:
        self._work += 1

    def work_done(self) -> None:
        self._work = max(0, self._work - 1)
        self._table.touch(self)  # as over TCP: finishing work is activity

    def peer_validated(self) -> None:
        """The peer proved its address: no amplification cap from now on."""
        self.validated = True


class PeerTable:
    """Class-handler instances by peer address, least recently active first."""

    def __init__(self, loop: EventLoop, factory: HandlerFactory, max_peers: int,
                 idle_timeout: float) -> None:
        self.loop = loop
        self._factory = factory
        self.max_peers = max_peers
        self.idle_timeout = idle_timeout
        self._peers: OrderedDict[Any, DatagramPeer] = OrderedDict()
        self._sweep: Timer | None = None
        self._error_log = RateLimitedLog(log, level=logging.ERROR)
        self._full_log = RateLimitedLog(log)
        #: ``send_error`` lines (at most one a second: a flood may provoke one per datagram).
        self.quiet_log = RateLimitedLog(log, level=logging.INFO)
        #: Datagrams not handed over, by reason ("paused", "handler error", "peer table full"
        #: counts evictions).
        self.counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, address: object) -> bool:
        return address in self._peers

    def start(self) -> None:
        if self.idle_timeout > 0:
            self._schedule_sweep()

    def _count(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    # -- datagrams -------------------------------------------------------------

    def datagram(self, address: Any, payload: bytes, route: Route, now: float) -> None:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._make(address, payload, route, now)
            if peer is None:
                return
        else:
            self._peers.move_to_end(address)
            peer.last_active = now
            peer.route = route
            if peer._paused:
                self._count("paused")
                return
            peer.allowance = AMPLIFICATION * len(payload)
        handler = peer.handler
        assert handler is not None
        self._call(peer, handler.message_received, "message_received", payload)

    def _make(self, address: Any, payload: bytes, route: Route, now: float) -> DatagramPeer | None:
        try:
            handler = self._factory()
        except Exception as exc:
            self._count("handler error")
            self._error_log.warning("UDP %s: handler factory failed; datagram dropped",
                                    _shown(address), peer=address, exc_info=exc)
            return None
        while len(self._peers) >= self.max_peers:
            _, oldest = self._peers.popitem(last=False)
            self._count("peer table full")
            self._full_log.warning("UDP peer table full (--udp-max-peers %d): dropped %s, the "
                                   "least recently active", self.max_peers,
                                   _shown(oldest.address), peer=oldest.address)
            self._lost(oldest)
        peer = DatagramPeer(self, address, route, now)
        peer.handler = handler
        peer.allowance = AMPLIFICATION * len(payload)
        if not self._call(peer, handler.connection_made, "connection_made"):
            # Never in the table; its connection_lost comes from the loop, as over TCP.
            peer._closing = True
            self.loop.call_soon(self._tell_lost, peer)
            return None
        if peer._closing:
            return None  # closed in connection_made: its connection_lost is on its way
        self._peers[address] = peer
        return peer

    def _call(self, peer: DatagramPeer, method: Callable[..., object], name: str,
              *args: object) -> bool:
        held: list[bytes] | None = []
        peer._held = held
        try:
            method(peer, *args)
        except Exception as exc:
            self._count("handler error")
            self._error_log.warning("UDP %s: handler %s failed; no reply", _shown(peer.address),
                                    name, peer=peer.address, exc_info=exc)
            return False
        finally:
            held, peer._held = peer._held, None
        for data in held or ():
            peer.route.reply(peer, data)
        return True

    def touch(self, peer: DatagramPeer) -> None:
        """``peer`` was active now: the most recent in the table."""
        if self._peers.get(peer.address) is peer:
            peer.last_active = self.loop.now
            self._peers.move_to_end(peer.address)

    # -- ending instances ------------------------------------------------------

    def drop_soon(self, peer: DatagramPeer) -> None:
        """``close``/``abort`` from the handler: out of the table now, told from the loop."""
        if peer._closing:
            return
        peer._closing = True
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
        self.loop.call_soon(self._tell_lost, peer)

    def _lost(self, peer: DatagramPeer) -> None:
        peer._closing = True
        self._tell_lost(peer)

    def _tell_lost(self, peer: DatagramPeer) -> None:
        handler, peer.handler = peer.handler, None
        if handler is None:
            return
        try:
            handler.connection_lost(peer, None)
        except Exception:
            log.exception("UDP %s: handler connection_lost failed", _shown(peer.address))

    def _schedule_sweep(self) -> None:
        self._sweep = self.loop.call_later(min(1.0, max(0.01, self.idle_timeout / 8)),
                                           self._idle_sweep)

    def _idle_sweep(self) -> None:
        self.expire(self.loop.now)
        self._schedule_sweep()

    def expire(self, now: float) -> int:
        """End the instances silent for ``idle_timeout`` (the oldest first); how many."""
        timeout = self.idle_timeout
        expired = []
        for peer in self._peers.values():  # oldest first: stop at the first one still active
            if now - peer.last_active < timeout:
                break
            if peer._work == 0:
                expired.append(peer)
        for peer in expired:
            del self._peers[peer.address]
            log.debug("UDP %s: idle for %.3g s, instance dropped", _shown(peer.address), timeout)
            self._lost(peer)
        return len(expired)

    def close(self) -> None:
        """The server stops: every instance ends."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        peers = list(self._peers.values())
        self._peers.clear()
        for peer in peers:
            self._lost(peer)


def _shown(address: Any) -> str:
    return format_address(address)
