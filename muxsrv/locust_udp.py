"""UdpMuxClient: a Locust user's UDP socket to a muxsrv ``--udp`` server (``udp://HOST:PORT``).

The same ``request``/``pipeline`` calls as :class:`~muxsrv.locust_client.MuxClient`,
over datagrams: each message is one datagram, its reply one datagram, and one
request is in flight at a time (a pipeline is its requests one after another:
UDP may reorder replies, and they carry no request number to match them by).
A reply that has not come ``timeout`` seconds (``--mux-timeout``) after its
request was sent is a lost datagram: the request fails with :class:`LostDatagram`
and is not sent again (a load test counts losses; it does not hide them).
Replies that arrive later are thrown away before the next request is sent.

The socket is connected, so only the server's datagrams reach it; an ICMP
port-unreachable (no server there) fails the request with
``ConnectionRefusedError``, and the next request opens a new socket.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from gevent import socket
from locust.env import Environment

from .wire import Done, Judge, judge_all, judge_one

__all__ = ["MAX_DATAGRAM", "LostDatagram", "UdpMuxClient"]

#: The largest UDP payload over IPv4 (65,535 - 20 IP header - 8 UDP header).
MAX_DATAGRAM = 65_507


class LostDatagram(TimeoutError):
    """No reply within the timeout: the request or its reply was lost (or is late)."""


class UdpMuxClient:
    """One UDP socket of a Locust user; see the module docstring."""

    def __init__(
        self,
        environment: Environment,
        address: tuple[str, int],
        *,
        request_type: str,
        timeout: float = 30.0,
        context: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.environment = environment
        self.address = address
        self.request_type = request_type
        self.timeout = timeout
        self.framing = "datagram"
        self.connects = 0  # sockets opened (a refused one is replaced)
        self.lost = 0  # requests failed for want of a reply
        self._context = context
        self._sock: socket.socket | None = None

    def request(
        self,
        payload: bytes,
        *,
        replies: int | Done | None = None,
        name: str = "request",
        check: Any = None,
        reply_size: int | None = None,
    ) -> bytes | list[bytes] | None:
        """Send one datagram; its reply (with ``replies=``: the list of them), or None."""
        if replies is None:
            got = self._exchange(payload, name, 1, judge_one(check))
            return None if got is None else got[0]
        return self._exchange(payload, name, replies, judge_all(check))

    def pipeline(
        self,
        payloads: Sequence[bytes],
        *,
        name: str = "request",
        check: Any = None,
        reply_size: int | None = None,
    ) -> list[bytes | None]:
        """Each message in turn, one in flight (see the module docstring)."""
        judge = judge_one(check)
        results: list[bytes | None] = []
        for payload in payloads:
            got = self._exchange(payload, name, 1, judge)
            results.append(None if got is None else got[0])
        return results

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _exchange(self, payload: bytes, name: str, replies: int | Done,
                  judge: Judge) -> list[bytes] | None:
        if isinstance(replies, int) and replies < 0:
            raise ValueError(f"replies must be 0 or more, not {replies}")
        done: Done = (lambda got: len(got) >= replies) if isinstance(replies, int) else replies
        if len(payload) > MAX_DATAGRAM:
            raise ValueError(f"a datagram carries at most {MAX_DATAGRAM:,} bytes")
        got: list[bytes] = []
        failure: Exception | None = None
        start_wall = time.time()
        start = time.perf_counter()
        try:
            sock = self._socket()
            sock.send(payload)
            deadline = start + self.timeout
            while not done(got):
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise LostDatagram(f"no reply within {self.timeout:g} s")
                sock.settimeout(left)
                try:
                    got.append(sock.recv(MAX_DATAGRAM + 1))
                except TimeoutError:
                    raise LostDatagram(f"no reply within {self.timeout:g} s") from None
            failure = judge(payload, got)
        except LostDatagram as exc:
            self.lost += 1
            failure = exc
        except OSError as exc:  # refused (ICMP), unreachable: a new socket next time
            self.close()
            failure = exc
        elapsed = (time.perf_counter() - start) * 1000
        self.environment.events.request.fire(  # type: ignore[no-untyped-call]
            request_type=self.request_type, name=name, response_time=elapsed,
            response_length=sum(map(len, got)), exception=failure, context=self._context(),
            start_time=start_wall,
        )
        return got if failure is None else None

    def _socket(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            host, port = self.address
            family, type_, proto, _name, addr = socket.getaddrinfo(
                host, port, 0, socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, type_, proto)
            try:
                sock.connect(addr)
            except OSError:
                sock.close()
                raise
            self._sock = sock
            self.connects += 1
            return sock
        # Late replies to earlier requests must not pass for this one's.
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError, InterruptedError, ConnectionRefusedError):
            while True:
                sock.recv(MAX_DATAGRAM + 1)
        return sock
