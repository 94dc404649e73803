"""A fake UDP socket for the deterministic UDP tests (FakeSelector reports it ready)."""

from __future__ import annotations

import errno
from collections import deque
from typing import Any

from muxsrv.codec import Buffer
from muxsrv.testing import FakeLoop, FakeSocket
from muxsrv.udp import DatagramEndpoint

#: Peers of the fake endpoint.
A = ("127.0.0.1", 40001)
B = ("127.0.0.1", 40002)
C = ("127.0.0.1", 40003)


class FakeDatagramSocket(FakeSocket):
    """A bound datagram socket: the test queues datagrams from addresses, reads what was sent.

    ``capacity`` (bytes ``sendto`` may still take; None: no limit) makes
    ``sendto`` raise ``BlockingIOError`` for a datagram that does not fit.
    """

    def __init__(self, address: Any = ("127.0.0.1", 9999)) -> None:
        super().__init__(address)
        self.inbox: deque[tuple[bytes, Any]] = deque()
        #: Every datagram sent, with its destination, in order.
        self.sent_to: list[tuple[bytes, Any]] = []
        self.recv_calls = 0

    def arrive(self, address: Any, *payloads: bytes) -> None:
        self.inbox.extend((payload, address) for payload in payloads)

    def replies_to(self, address: Any) -> list[bytes]:
        return [data for data, to in self.sent_to if to == address]

    @property
    def readable(self) -> bool:
        return bool(self.inbox)

    def getsockname(self) -> Any:
        return self._peer

    def recvfrom_into(self, buffer: memoryview) -> tuple[int, Any]:
        self._check()
        if not self.inbox:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        self.recv_calls += 1
        payload, address = self.inbox.popleft()
        buffer[: len(payload)] = payload
        return len(payload), address

    def sendto(self, data: Buffer, address: Any) -> int:
        self._check()
        data = bytes(data)
        if self.capacity is not None:
            if len(data) > self.capacity:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            self.capacity -= len(data)
        self.sent_to.append((data, address))
        return len(data)


def endpoint(fake: FakeLoop, sock: FakeDatagramSocket, **kwargs: Any) -> DatagramEndpoint:
    """An endpoint on the fake loop, listening on ``sock``."""
    ep = DatagramEndpoint(fake.loop, **kwargs)
    ep.listen("127.0.0.1", 0, [sock])  # type: ignore[list-item]
    return ep
