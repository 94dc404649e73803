"""The UDP endpoint (``--udp``): the same handlers over datagrams, on the same loop.

Each datagram is one message (framing does not apply: UDP never glues two
together), and the reply goes back to its sender with ``sendto``.  A
function handler is called as over TCP; a class handler gets one instance
per peer address (``muxsrv.udp_peers``, which also states the amplification
rule and when an instance ends).

Reading: a readable socket is read until ``EAGAIN`` but at most
``UDP_BATCH`` (64) datagrams per wake-up, so a flood on UDP cannot starve
the TCP clients on the same loop, nor they the datagrams (asyncio reads one
per wake-up, libuv 32).  Each read goes into one preallocated 64 KiB buffer.

Sending: ``sendto`` at once; when it would block (``EAGAIN``), the reply is
queued and the socket watched for writing, the queue bounded in bytes by
``--udp-max-queue`` (1 MiB): past it replies are dropped and counted, and
the loop never blocks.  A reply over 65,507 bytes (the most an IPv4
datagram carries) is dropped and logged, as is one over the amplification
cap.  Every drop is counted in ``counts`` by reason and logged at most once
a second per reason (the senders may be forged: a log line each would be a
flood of its own).

In protected mode (a non-loopback ``--host`` with no authentication),
datagrams from non-loopback sources are dropped, as TCP connections from
them are refused.

This module and ``muxsrv.server`` are the ones that touch the endpoint's
sockets; only the loop touches the selector.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from .address import format_address
from .listening import bind_sockets
from .loop import EVENT_READ, EVENT_WRITE
from .ratelog import RateLimitedLog
from .udp_peers import AMPLIFICATION, DatagramPeer, PeerTable

if TYPE_CHECKING:
    from .handler import HandlerFactory, HandlerFunction
    from .loop import EventLoop

__all__ = ["DEFAULT_MAX_PEERS", "DEFAULT_MAX_QUEUE", "MAX_DATAGRAM", "UDP_BATCH",
           "DatagramEndpoint"]

log = logging.getLogger("muxsrv.udp")

#: Datagrams read per wake-up of one socket, at most (asyncio: 1, libuv: 32).
UDP_BATCH: Final = 64
#: The largest UDP payload over IPv4 (65,535 - 20 IP header - 8 UDP header).
MAX_DATAGRAM: Final = 65_507
#: --udp-max-peers: class-handler instances kept at once.
DEFAULT_MAX_PEERS: Final = 10_000
#: --udp-max-queue: bytes of replies waiting for a socket that would block.
DEFAULT_MAX_QUEUE: Final = 1 << 20
#: Large enough for any datagram (65,507), so none is ever truncated.
_BUFFER_SIZE: Final = 1 << 16


class _Channel:
    """One bound UDP socket: the loop calls it; it hands over to the endpoint."""

    __slots__ = ("endpoint", "queue", "sock", "writing")

    def __init__(self, endpoint: DatagramEndpoint, sock: socket.socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.queue: deque[tuple[bytes, Any]] = deque()
        self.writing = False

    def handle_event(self, mask: int) -> None:
        if mask & EVENT_WRITE:
            self.endpoint._flush(self)
        if mask & EVENT_READ:
            self.endpoint._read(self)

    def reply(self, peer: DatagramPeer, data: bytes) -> None:
        """A class handler's reply (``udp_peers.Route``): the amplification cap first."""
        endpoint = self.endpoint
        if not peer.validated:
            if len(data) > peer.allowance:
                endpoint._drop("amplification", peer.address, len(data))
                return
            peer.allowance -= len(data)
        endpoint._sendto(self, data, peer.address)


class DatagramEndpoint:
    """The UDP sockets of a server and what they serve; see the module docstring."""

    def __init__(
        self,
        loop: EventLoop,
        *,
        function: HandlerFunction | None = None,
        factory: HandlerFactory | None = None,
        max_peers: int = DEFAULT_MAX_PEERS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        idle_timeout: float = 300.0,
        max_message: int = MAX_DATAGRAM,
        loopback_only: bool = False,
    ) -> None:
        if (function is None) == (factory is None):
            raise ValueError("give exactly one of function= and factory=")
        self.loop = loop
        self._function = function
        self.peers = (PeerTable(loop, factory, max_peers, idle_timeout)
                      if factory is not None else None)
        self.max_queue = max_queue
        self.max_message = max_message
        self.loopback_only = loopback_only
        #: Bytes of replies queued on all sockets.
        self.queued = 0
        #: Datagrams and replies dropped, by reason.
        self.counts: dict[str, int] = {}
        self._logs: dict[str, RateLimitedLog] = {}
        self._channels: list[_Channel] = []
        self._buffer = memoryview(bytearray(_BUFFER_SIZE))
        self.closed = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [channel.sock.getsockname()[:2] for channel in self._channels]

    def listen(self, host: str, port: int, socks: list[socket.socket] | None = None,
               ) -> list[tuple[str, int]]:
        """Bind UDP on every address ``host`` resolves to, on ``port`` (or adopt ``socks``).

        Raises OSError (the caller names the address).
        """
        if socks is None:
            socks = bind_sockets(host, port, False, lambda sock: None, kind=socket.SOCK_DGRAM)
        for sock in socks:
            sock.setblocking(False)
            channel = _Channel(self, sock)
            self._channels.append(channel)
            self.loop.register(sock, EVENT_READ, channel)
        if self.peers is not None:
            self.peers.start()
        return self.addresses

    # -- reading ---------------------------------------------------------------

    def _read(self, channel: _Channel) -> None:
        recv = channel.sock.recvfrom_into
        buffer = self._buffer
        function = self._function
        peers = self.peers
        now = self.loop.now
        for _ in range(UDP_BATCH):
            if self.closed:
                return  # a handler stopped the server inside this batch
            try:
                size, address = recv(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # (an ICMP error on some systems): the next read goes on
                self._drop("receive error", None, 0, exc)
                return
            if size > self.max_message:
                self._drop("datagram over --max-frame", address, size)
                continue
            if self.loopback_only and not _loopback(address):
                self._drop("not loopback (protected mode)", address, size)
                continue
            payload = bytes(buffer[:size])
            if peers is not None:
                peers.datagram(address, payload, channel, now)
                continue
            assert function is not None
            try:
                reply = function(payload)
            except Exception as exc:
                self._drop("handler error", address, size, exc)
                continue
            if reply is None:
                continue
            try:
                data = reply if type(reply) is bytes else memoryview(reply).tobytes()
            except TypeError as exc:
                self._drop("handler error", address, size, exc)
                continue
            if len(data) > AMPLIFICATION * size:
                self._drop("amplification", address, len(data))
                continue
            self._sendto(channel, data, address)

    # -- sending -----------------------------------------------------------------

    def _sendto(self, channel: _Channel, data: bytes, address: Any) -> None:
        if len(data) > MAX_DATAGRAM:
            self._drop("reply over 65,507 bytes", address, len(data))
            return
        if self.closed:
            return
        if not channel.queue:
            try:
                channel.sock.sendto(data, address)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self._drop("send error", address, len(data), exc)
                return
        if self.queued + len(data) > self.max_queue:
            self._drop("queue full (--udp-max-queue)", address, len(data))
            return
        channel.queue.append((data, address))
        self.queued += len(data)
        if not channel.writing:
            channel.writing = True
            self.loop.modify(channel.sock, EVENT_READ | EVENT_WRITE, channel)

    def _flush(self, channel: _Channel) -> None:
        queue = channel.queue
        sendto = channel.sock.sendto
        while queue:
            data, address = queue[0]
            try:
                sendto(data, address)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop("send error", address, len(data), exc)
            queue.popleft()
            self.queued -= len(data)
        if channel.writing and not self.closed:
            channel.writing = False
            self.loop.modify(channel.sock, EVENT_READ, channel)

    # -- drops and the end ---------------------------------------------------------

    def _drop(self, reason: str, address: Any, size: int, exc: BaseException | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        logger = self._logs.get(reason)
        if logger is None:
            level = logging.ERROR if reason == "handler error" else logging.WARNING
            logger = self._logs[reason] = RateLimitedLog(log, level=level)
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        logger.warning("UDP %s: %d bytes dropped: %s%s (%d so far)", format_address(address),
                       size, reason, detail, self.counts[reason],
                       peer=address, exc_info=exc if reason == "handler error" else None)

    def close(self) -> None:
        """Send what is queued if the sockets take it now, close them, end every instance."""
        if self.closed:
            return
        for channel in self._channels:
            self._flush(channel)
        self.closed = True
        for channel in self._channels:
            self.loop.unregister(channel.sock)
            channel.sock.close()
            channel.queue.clear()
        self.queued = 0
        if self.peers is not None:
            self.peers.close()
        dropped = self.dropped()
        if dropped:
            log.info("UDP: dropped %s", ", ".join(f"{count} ({reason})"
                                                  for reason, count in sorted(dropped.items())))

    def dropped(self) -> dict[str, int]:
        """Every count: the endpoint's drops and the peer table's."""
        counts = dict(self.counts)
        if self.peers is not None:
            for reason, count in self.peers.counts.items():
                counts[reason] = counts.get(reason, 0) + count
        return counts


def _loopback(address: Any) -> bool:
    try:
        return ipaddress.ip_address(address[0].split("%")[0]).is_loopback
    except (ValueError, TypeError, IndexError):
        return False
