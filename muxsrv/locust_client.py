"""MuxClient: one connection of a Locust user to muxsrv, and the requests made on it.

The plumbing under ``muxsrv.locust.MuxUser`` (which re-exports everything
here).  One gevent socket (cooperative whether or not the process is
monkey-patched), opened on first use: TCP, then for a ``tls://`` host the TLS
handshake (certificate and host name verified), then with a token
``AUTH <token>`` and the server's ``OK``; a refusal there is
:class:`AuthenticationFailed`, which fails the requests like a failed connect
(and the next request connects again, after the usual pause).  The token is
never logged.  What a request is, how replies are counted and checked, and
what fails a request: see ``muxsrv.locust``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, overload

import gevent
from gevent import socket
from locust.env import Environment

from .wire import (
    FRAMINGS,
    Check,
    Done,
    Frame,
    Judge,
    ProtocolError,
    Reader,
    RepliesCheck,
    ServerError,
    encode,
    judge_all,
    judge_one,
    make_decoder,
)

__all__ = ["AuthenticationFailed", "MuxClient", "resolve"]

RECV_SIZE = 256 * 1024
# Batches up to this size are sent before reading: far below any kernel socket
# buffer, so the send cannot stall behind replies we have not read yet.  A
# bigger batch is sent from a second greenlet while this one reads replies.
INLINE_SEND_LIMIT = 64 * 1024
# Pause after a failed connect: doubles from the first value up to the last.
CONNECT_BACKOFF = (0.05, 2.0)
# Connect attempts after a goodbye, at most (with the back-off, about 30 s).
RECONNECT_ATTEMPTS = 25

log = logging.getLogger("muxsrv.locust")
_goodbye_logged = False  # the first goodbye is logged at INFO, the others at DEBUG

_resolved: dict[tuple[str, int], list[tuple[int, Any]]] = {}


def resolve(address: tuple[str, int]) -> list[tuple[int, Any]]:
    """(family, sockaddr) pairs to try for (host, port): numeric hosts as they are,
    names looked up once per process.

    Why not per connect: gevent resolves on a small thread pool whose answers
    wait for a turn of the (busy) hub.  With 5,000 users connecting, connect
    times had a median of 1 s and a maximum of 11 s; without the lookup, 34 ms.
    """
    host, port = address
    if "%" not in host:  # a scoped IPv6 address needs getaddrinfo for its scope id
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [(family, (host, port))]
    if address not in _resolved:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        _resolved[address] = [(info[0], info[4]) for info in infos]
    return _resolved[address]


class AuthenticationFailed(ConnectionError):
    """The server refused the connection's ``AUTH <token>`` (the reason is the server's)."""


class MuxClient:
    """One connection to muxsrv; reconnects on the next request after any failure ends it.

    ``tls``: a client SSL context (the handshake names the host of ``address``,
    so its certificate is checked for it); ``token``: sent as ``AUTH <token>``
    first on every connection, length or line framing only.
    """

    def __init__(
        self,
        environment: Environment,
        address: tuple[str, int],
        *,
        request_type: str,
        timeout: float = 30.0,
        framing: str = "length",
        context: Callable[[], dict[str, Any]] = dict,
        tls: ssl.SSLContext | None = None,
        token: bytes | None = None,
    ) -> None:
        if framing not in FRAMINGS:
            raise ValueError(f"unknown framing {framing!r}; choose from {', '.join(FRAMINGS)}")
        if token is not None and (framing == "raw" or b"\n" in token):
            raise ValueError("a token goes with length or line framing (raw has no messages)")
        self.environment = environment
        self.address = address
        self.request_type = request_type
        self.timeout = timeout
        self.framing = framing
        self.connects = 0  # successful connects; more than one means the user reconnected
        self.goodbyes = 0  # goodbyes after which the in-flight requests were resent
        self._context = context
        self._tls = tls
        self._token = token
        self._sock: socket.socket | None = None
        self._decoder: Reader = make_decoder(framing)
        self._backoff = 0.0

    @overload
    def request(
        self, payload: bytes, *, name: str = ..., check: Check | None = ...,
        reply_size: int | None = ...,
    ) -> bytes | None: ...

    @overload
    def request(
        self, payload: bytes, *, replies: int | Done, name: str = ...,
        check: RepliesCheck | None = ..., reply_size: int | None = ...,
    ) -> list[bytes] | None: ...

    def request(
        self,
        payload: bytes,
        *,
        replies: int | Done | None = None,
        name: str = "request",
        check: Any = None,
        reply_size: int | None = None,
    ) -> bytes | list[bytes] | None:
        """Send one message; return its reply (with ``replies=``: the list of its
        replies), or None if the request failed."""
        if replies is None:
            return self.pipeline([payload], name=name, check=check, reply_size=reply_size)[0]
        got = self._exchange([payload], name, replies, reply_size, judge_all(check))
        return got[0]

    def pipeline(
        self,
        payloads: Sequence[bytes],
        *,
        name: str = "request",
        check: Check | None = None,
        reply_size: int | None = None,
    ) -> list[bytes | None]:
        """Send all messages at once, then read their replies (one each) in order.

        Each reply is checked and reported as its own request; the list holds
        the replies of the requests that succeeded and None for the others.
        """
        got = self._exchange(payloads, name, 1, reply_size, judge_one(check))
        return [None if r is None else r[0] for r in got]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._decoder = make_decoder(self.framing)

    def _exchange(
        self,
        payloads: Sequence[bytes],
        name: str,
        replies: int | Done,
        reply_size: int | None,
        judge: Judge,
    ) -> list[list[bytes] | None]:
        if isinstance(replies, int) and replies < 0:
            raise ValueError(f"replies must be 0 or more, not {replies}")
        done: Done = (lambda got: len(got) >= replies) if isinstance(replies, int) else replies
        # raw has no boundaries: with a count, each reply is reply_size bytes (or the
        # payload's size); with a done function, whatever has arrived.
        counted = isinstance(replies, int)
        results: list[list[bytes] | None] = []
        got: list[bytes] = []
        start = time.perf_counter()
        start_wall = time.time()
        deadline = start + self.timeout
        sender: gevent.Greenlet | None = None
        try:
            sock = self._connected()
            sender = self._send(sock, payloads)
            while len(results) < len(payloads):
                sent = payloads[len(results)]
                if not done(got):
                    size = (len(sent) if reply_size is None else reply_size) if counted else None
                    frame = self._read_frame(sock, deadline, size)
                    if frame.is_goodbye:
                        # Every request before it was answered and none after it was
                        # read: send those again on a new connection.
                        if sender is not None:
                            sender.kill()
                        unanswered = payloads[len(results) :]
                        got = []
                        sock = self._reconnect_after_goodbye(deadline, len(unanswered))
                        sender = self._send(sock, unanswered)
                        continue
                    if not frame.is_error:
                        got.append(frame.payload)
                        continue
                    failure: Exception | None = ServerError(
                        frame.payload.decode("utf-8", "replace")
                    )
                else:
                    failure = judge(sent, got)
                elapsed = (time.perf_counter() - start) * 1000
                size_in = sum(map(len, got))
                self._fire(name, start_wall, elapsed, size_in, failure)
                results.append(got if failure is None else None)
                got = []
            if sender is not None:
                sender.join()  # every reply is in, so the send has finished
        except (OSError, ProtocolError) as exc:
            if sender is not None:
                sender.kill()
            connected = self._sock is not None
            self.close()
            elapsed = (time.perf_counter() - start) * 1000
            for _ in payloads[len(results) :]:
                self._fire(name, start_wall, elapsed, 0, exc)
                results.append(None)
            if connected:
                log.debug("%s: connection to %s:%d ended: %r", name, *self.address, exc)
            else:
                self._pause_before_reconnect()
        except BaseException:
            # Interrupted (the user is being stopped): replies may still be in
            # flight, so this connection can never be trusted again.
            if sender is not None:
                sender.kill()
            self.close()
            raise
        return results

    def _send(self, sock: socket.socket, payloads: Sequence[bytes]) -> gevent.Greenlet | None:
        """Send the requests: at once if small, else from a greenlet, returned, while
        this one reads the replies.

        A send that fails because the server closed is not an error here: the
        reader finds out why (replies or a goodbye still buffered, else the end).
        """
        data = b"".join(encode(self.framing, p) for p in payloads)
        sock.settimeout(self.timeout)
        if len(data) > INLINE_SEND_LIMIT:
            return gevent.spawn(_send_all, sock, data)
        _send_all(sock, data)
        return None

    def _reconnect_after_goodbye(self, deadline: float, unanswered: int) -> socket.socket:
        """The server said goodbye: connect again, pausing as after a failed connect,
        until the batch's deadline; the connect error if no server accepts by then."""
        global _goodbye_logged
        self.close()
        self.goodbyes += 1
        host, port = self.address
        if _goodbye_logged:
            log.debug("%s:%d said goodbye: resending %d requests", host, port, unanswered)
        else:
            _goodbye_logged = True
            log.info("%s:%d is shutting down: reconnecting and resending the requests in "
                     "flight, not failing them (later goodbyes: DEBUG)", host, port)
        pause, most = CONNECT_BACKOFF
        for attempt in range(RECONNECT_ATTEMPTS):
            try:
                return self._connected()
            except OSError:
                if attempt == RECONNECT_ATTEMPTS - 1 or time.perf_counter() + pause >= deadline:
                    raise
            gevent.sleep(pause)
            pause = min(most, pause * 2)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = self._open()
            try:
                if self._tls is not None:
                    sock = self._tls.wrap_socket(sock, server_hostname=self.address[0])
                if self._token is not None:
                    self._authenticate(sock, self._token)
            except BaseException:
                sock.close()
                self._decoder = make_decoder(self.framing)
                raise
            self._sock = sock
            self._backoff = 0.0
            self.connects += 1
        return self._sock

    def _authenticate(self, sock: socket.socket, token: bytes) -> None:
        """``AUTH <token>``, then the server's ``OK``; AuthenticationFailed if refused."""
        sock.settimeout(self.timeout)
        sock.sendall(encode(self.framing, b"AUTH " + token))
        try:
            frame = self._read_frame(sock, time.perf_counter() + self.timeout, None)
        except ConnectionResetError:
            # Line framing has no error channel: a refusal is a close.
            raise AuthenticationFailed("the server closed the connection after AUTH "
                                       "(wrong token?)") from None
        if frame.is_error or frame.payload != b"OK":
            text = frame.payload.decode("utf-8", "replace")
            raise AuthenticationFailed(text if frame.is_error else f"unexpected reply to AUTH: "
                                       f"{text[:60]!r}")

    def _open(self) -> socket.socket:
        """Connect to the first address that accepts, like `socket.create_connection`."""
        failure: OSError | None = None
        for family, sockaddr in resolve(self.address):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            return sock
        raise failure or OSError(f"no address found for {self.address[0]}")

    def _pause_before_reconnect(self) -> None:
        first, most = CONNECT_BACKOFF
        self._backoff = min(most, self._backoff * 2 or first)
        gevent.sleep(self._backoff)

    def _read_frame(self, sock: socket.socket, deadline: float, size: int | None) -> Frame:
        while (frame := self._decoder.maybe_next_frame(size)) is None:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {self.timeout:g} s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(RECV_SIZE)
            except TimeoutError:
                raise TimeoutError(f"no reply within {self.timeout:g} s") from None
            if not data:
                raise ConnectionResetError("server closed the connection")
            self._decoder.receive_data(data)
        return frame

    def _fire(
        self, name: str, start_wall: float, elapsed_ms: float, length: int, exc: Exception | None
    ) -> None:
        self.environment.events.request.fire(  # type: ignore[no-untyped-call]
            request_type=self.request_type,
            name=name,
            response_time=elapsed_ms,
            response_length=length,
            exception=exc,
            context=self._context(),
            start_time=start_wall,
        )


def _send_all(sock: socket.socket, data: bytes) -> None:
    # Closed by the server: the reader sees why.  Swallowed here, so a send
    # greenlet does not die with a traceback gevent would print.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLEOFError,
                             ssl.SSLZeroReturnError):
        sock.sendall(data)


