"""A blocking client for muxsrv (the command line, ``muxsrv-client``, is in client_cli).

    with Client("127.0.0.1", 9999) as c:
        c.request(b"hello")                 # -> b"hello" from echo
        c.pipeline([b"a", b"b", b"c"])      # all sent before the replies are read
        c.exec("ls -l")                     # -> ExecResult, from --handler exec

It frames with the same sans-IO codecs as the server.  An error frame from the
server raises :class:`ServerError` carrying the server's message; the end of
the connection raises :class:`ConnectionClosed`; timeouts raise
``TimeoutError``.

A server that shuts down says goodbye: the error frame ``server shutting
down`` at a message boundary, then the close.  Every message sent before it
was answered and none after it was read, so the client keeps, in order, the
messages whose reply has not arrived; on the goodbye it connects to the same
address again and resends them, and the caller sees each reply once, in
order, as if nothing had happened.  If no server accepts within
``reconnect_timeout``, :class:`ServerGone` is raised.  Only ``length`` framing
has an error channel, so only it resends; ``resend=False`` turns it off (for a
handler that keeps per-connection state, which a new connection starts
afresh: then the goodbye is a ServerError like any other).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from .codec import SHUTTING_DOWN
from .errors import ConnectionClosed, ServerError
from .framing import (
    ENCODERS,
    FRAMINGS,
    MAX_FRAME_LIMIT,
    Buffer,
    Decoder,
    ErrorFrame,
    LengthDecoder,
    make_decoder,
)
from .handlers.exec_protocol import ExecResult, ReplyError, decode_reply

__all__ = [
    "Client",
    "ConnectionClosed",
    "ExecResult",
    "ReplyError",
    "ServerError",
    "ServerGone",
    "main",
]

#: One recv's size (below glibc's default mmap threshold, so it is cheap to allocate) ...
_RECV_SIZE = 64 * 1024
#: ... and the most asked for at once of a large reply's body.
_BODY_RECV_MAX = 4 * 1024 * 1024
#: Seconds to wait for the connection and each reply, unless told otherwise.
DEFAULT_TIMEOUT = 10.0
#: After a goodbye, how long to keep trying to connect again: a restarted
#: server listens well within this, and a server that is gone for good is
#: reported instead of waited for.
RECONNECT_TIMEOUT = 10.0
#: Pause between those attempts: doubles from the first value up to the last,
#: so a quick restart is caught quickly and a slow one is not hammered ...
RECONNECT_BACKOFF = (0.05, 1.0)
#: ... and at most this many attempts (about 14 fit in RECONNECT_TIMEOUT).
RECONNECT_ATTEMPTS = 20


class ServerGone(ConnectionClosed):
    """The server said goodbye and no server accepted a new connection in time."""


class Client:
    """One connection to a muxsrv server (not thread-safe).

    ``timeout`` bounds each reply, and the connect unless ``connect_timeout`` is
    given.  ``tls``: True (the system's CAs, host name checked) or an
    ``ssl.SSLContext`` of your own; ``shutdown_write`` then shuts TCP only (the
    ssl module has no half-close: the server logs a truncated close and still
    answers).  With ``token``, every connection (reconnections too) starts with
    ``AUTH <token>``; a refusal raises :class:`ServerError`.  ``reconnects``
    counts the new connections made after the first: after a goodbye (then it
    resent) or by :meth:`reconnect`.

    ``transport="udp"`` makes a :class:`~muxsrv.client_udp.UdpClient` instead
    (a server with ``--udp``): one datagram per message, one request in
    flight, ``timeout`` per try (default 1 s) and ``retries`` (default 2).
    """

    def __new__(cls, *args: Any, transport: str = "tcp", **kwargs: Any) -> Client:
        if transport == "udp":
            from .client_udp import UdpClient

            return super().__new__(UdpClient)
        if transport != "tcp":
            raise ValueError(f"unknown transport {transport!r}; choose tcp or udp")
        return super().__new__(cls)

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9999,
        framing: str = "length",
        timeout: float | None = 10.0,
        max_frame: int = MAX_FRAME_LIMIT,
        *,
        resend: bool = True,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
        connect_timeout: float | None = None,
        token: str | bytes | None = None,
        tls: bool | ssl.SSLContext = False,
        transport: str = "tcp",
    ) -> None:
        if framing not in FRAMINGS:
            raise ValueError(f"unknown framing {framing!r}; choose from {', '.join(FRAMINGS)}")
        self.framing = framing
        self.timeout = timeout
        self.address = (host, port)
        self.reconnect_timeout = reconnect_timeout
        self.reconnects = 0
        self._encode = ENCODERS[framing]
        self._max_frame = max_frame
        self._decoder = self._new_decoder()
        self._inbox: deque[bytes] = deque()
        self._resend = resend and framing == "length"  # the others have no error channel
        #: What was sent and not yet answered, encoded, oldest first (only to resend).
        self._unanswered: deque[bytes] = deque()
        #: Reconnecting since a goodbye with no reply since: give up at this time.
        self._give_up_at: float | None = None
        self._write_shut = False
        #: Sent as ``AUTH <token>`` first on every connection (``--auth-token-file``).
        self._token = token.encode() if isinstance(token, str) else token
        if self._token is not None and (b"\n" in self._token or framing == "raw"):
            raise ValueError("a token goes with length or line framing and has no newline")
        #: TLS: True verifies the server's certificate and host name with the system's CAs.
        self._tls = ssl.create_default_context() if tls is True else tls or None
        self._sock = self._connect(timeout if connect_timeout is None else connect_timeout)

    def _new_decoder(self) -> Decoder:
        if self.framing == "length":
            return LengthDecoder(self._max_frame, accept_errors=True)
        return make_decoder(self.framing, self._max_frame)

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.address[0])
            except BaseException:
                sock.close()
                raise
        sock.settimeout(self.timeout)
        if self._token is not None:
            try:
                self._authenticate(sock, self._token)
            except BaseException:
                sock.close()
                raise
        return sock

    def _authenticate(self, sock: socket.socket, token: bytes) -> None:
        """Send ``AUTH <token>``; wait for ``OK`` (ServerError: the server's refusal)."""
        sock.sendall(self.encode(b"AUTH " + token))
        decoder = self._decoder
        while True:
            data = sock.recv(_RECV_SIZE)
            if not data:
                raise ConnectionClosed("the server closed the connection during authentication")
            messages = decoder.feed(data)
            if messages:
                break
        first = messages[0]
        if isinstance(first, ErrorFrame):
            raise ServerError(first.text)
        if first != b"OK":
            raise ConnectionClosed(f"unexpected answer to AUTH: {first[:40]!r}")
        self._inbox.extend(messages[1:])

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def abort(self) -> None:
        """Close with a reset: the server drops what it owed this connection, and an
        exec server kills the command it was running for it."""
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._sock.close()

    def closed_by_server(self) -> str | None:
        """Between requests, without waiting: None while the connection is open; else
        why the server closed it: its last error frame's text (``idle timeout (300 s)``,
        ``server shutting down``), the error (a reset), or "" if it said nothing."""
        sock = self._sock
        if sock.fileno() < 0:
            return "closed by this client"
        try:
            sock.setblocking(False)
            while not self._receive_some():
                pass
        except BlockingIOError:
            return None  # all read, and open
        except ConnectionClosed as exc:
            reason = "" if self._decoder.error is None else str(exc)
        except OSError as exc:
            reason = exc.strerror or str(exc)
        else:
            return SHUTTING_DOWN  # the goodbye, which resending keeps out of the inbox
        finally:
            if sock.fileno() >= 0:
                sock.settimeout(self.timeout)
        errors = [m for m in self._inbox if isinstance(m, ErrorFrame)]
        return errors[-1].text if errors else reason

    def reconnect(self) -> None:
        """A new connection to the same address in place of this one (which the server
        closed, say), retried as after a goodbye; then ServerGone.  Replies not yet
        read, and what is unanswered, are dropped: nothing is resent."""
        self._inbox.clear()
        self._unanswered.clear()
        self._give_up_at = None
        self._write_shut = False
        self._reconnect()

    def shutdown_write(self) -> None:
        """Tell the server we send no more (it still delivers every reply)."""
        self._sock.shutdown(socket.SHUT_WR)
        self._write_shut = True

    def encode(self, payload: Buffer) -> bytes:
        if self.framing == "line" and b"\n" in bytes(payload):
            raise ValueError("with line framing a message cannot contain a newline")
        out: list[Buffer] = []
        self._encode(out, payload)
        return b"".join(out)

    def send(self, payload: Buffer) -> None:
        """Send one message."""
        data = self.encode(payload)
        if self._resend:
            self._unanswered.append(data)
        try:
            self._sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            if not self._goodbye_waiting():
                raise
            self._resume()

    def recv(self) -> bytes:
        """The next reply; raises ServerError for an error frame."""
        self._fill(1)
        return self._check(self._inbox.popleft())

    def request(self, payload: Buffer) -> bytes:
        """Send one message and return its reply."""
        self.send(payload)
        return self.recv()

    def exec(self, command: str | Buffer) -> ExecResult:
        """Run ``command`` on an exec server (``--handler exec``) and return its result.

        A str is sent as UTF-8 (lone surrogates as the bytes they stand for, so a
        non-UTF-8 file name survives).  This client's timeout bounds the wait:
        make it longer than the server's ``--exec-timeout``, or None.  Raises
        ServerError for an error frame, ReplyError for a reply that is not one.
        """
        if self.framing != "length":
            raise ValueError("exec needs length framing")
        if isinstance(command, str):
            command = command.encode("utf-8", "surrogateescape")
        return decode_reply(self.request(command))

    def pipeline(self, payloads: Iterable[Buffer]) -> list[bytes]:
        """Send every message without waiting, then collect one reply per message.

        Sending and receiving interleave, so a pipeline larger than the socket
        buffers cannot deadlock against the server's flow control.  An error
        frame raises ServerError after all replies have been read.
        """
        if self.framing == "raw":
            raise ValueError("pipeline() needs length or line framing: raw has no boundaries")
        frames = [self.encode(p) for p in payloads]
        if self._resend:
            self._unanswered.extend(frames)
        try:
            self._transmit(b"".join(frames))
            self._fill(len(frames))
        except ServerGone:
            raise
        except ConnectionError:
            # Closed or reset early: if the server said why (an error frame, as
            # for a message over its --max-frame), that is the error to raise.
            for reply in self._inbox:
                self._check(reply)
            raise
        replies = [self._inbox.popleft() for _ in frames]
        return [self._check(r) for r in replies]

    # -- receiving, and resending after a goodbye -----------------------------

    def _fill(self, count: int) -> None:
        """Receive until the inbox holds ``count`` replies."""
        while len(self._inbox) < count:
            if self._receive_some():
                self._resume()

    def _transmit(self, data: bytes) -> None:
        """Send ``data``, reading replies into the inbox meanwhile; after a goodbye,
        send what is unanswered on the new connection instead."""
        view = memoryview(data)
        with selectors.DefaultSelector() as sel:
            while view:
                sock = self._sock
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
                try:
                    view, goodbye = self._send_reading(sel, sock, view)
                finally:
                    sel.unregister(sock)
                    sock.settimeout(self.timeout)
                if goodbye:
                    self._reconnect()
                    view = memoryview(b"".join(self._unanswered))

    def _send_reading(
        self, sel: selectors.BaseSelector, sock: socket.socket, view: memoryview
    ) -> tuple[memoryview, bool]:
        """Send on ``sock`` until done or the server's goodbye: (what is left, goodbye?)."""
        while view:
            # Plaintext already decrypted inside a TLS socket does not make it readable.
            held = isinstance(sock, ssl.SSLSocket) and sock.pending()
            ready = [(None, selectors.EVENT_READ)] if held else sel.select(self.timeout)
            if not ready:
                raise TimeoutError(f"no reply within {self.timeout} s")
            mask = ready[0][1]
            if mask & selectors.EVENT_WRITE:
                try:
                    view = view[sock.send(view) :]
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    if not self._goodbye_waiting():
                        raise
                    return view, True
            if mask & selectors.EVENT_READ:
                with contextlib.suppress(BlockingIOError, ssl.SSLWantReadError,
                                         ssl.SSLWantWriteError):
                    if self._receive_some():
                        return view, True
        return view, False

    def _receive_some(self) -> bool:
        """Receive once into the inbox; True if that brought the server's goodbye
        (the connection is then over)."""
        decoder = self._decoder
        want = decoder.want  # inside a large reply: ask for just the rest of its body
        data = self._sock.recv(min(want, _BODY_RECV_MAX) if want else _RECV_SIZE)
        if not data:
            raise ConnectionClosed("the server closed the connection")
        messages = decoder.feed(data)
        if not self._resend:
            self._inbox.extend(messages)
        else:
            for message in messages:
                if isinstance(message, ErrorFrame) and message.text == SHUTTING_DOWN:
                    return True  # nothing follows a goodbye
                self._inbox.append(message)
                if self._unanswered:
                    self._unanswered.popleft()
                self._give_up_at = None  # a reply: the server is back
        if decoder.error is not None:
            raise ConnectionClosed(f"bad data from the server: {decoder.error}")
        return False

    def _goodbye_waiting(self) -> bool:
        """A send failed: read what the server sent before it went (its replies, an
        error frame saying why); True if that ends with its goodbye."""
        sock = self._sock
        sock.setblocking(False)
        try:
            # Bounded: the server is gone, so only what is already buffered comes.
            while not self._receive_some():
                pass
        except OSError:  # BlockingIOError: all read; or the end, or a reset
            return False
        finally:
            sock.settimeout(self.timeout)
        return True

    def _resume(self) -> None:
        """After a goodbye: connect again and resend what was not answered."""
        self._reconnect()
        self._transmit(b"".join(self._unanswered))
        if self._write_shut:
            self._sock.shutdown(socket.SHUT_WR)

    def _reconnect(self) -> None:
        """Replace the connection the server closed with a goodbye by a new one."""
        self._sock.close()
        self._decoder = self._new_decoder()
        now = time.monotonic()
        if self._give_up_at is None:
            self._give_up_at = now + self.reconnect_timeout
        pause, most = RECONNECT_BACKOFF
        failure: OSError | None = None
        for _attempt in range(RECONNECT_ATTEMPTS):
            remaining = self._give_up_at - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._sock = self._connect(min(remaining, self.timeout or remaining))
            except OSError as exc:
                failure = exc
                time.sleep(max(0.0, min(pause, self._give_up_at - time.monotonic())))
                pause = min(most, pause * 2)
                continue
            self.reconnects += 1
            if not self._unanswered:
                self._give_up_at = None  # no reply will come to say the server is back
            return
        host, port = self.address
        reason = f": {failure.strerror or failure}" if failure else ""
        raise ServerGone(
            f"the server shut down and none accepted at {host}:{port} within "
            f"{self.reconnect_timeout:g} s{reason}; {len(self._unanswered)} request(s) "
            "unanswered"
        ) from failure

    @staticmethod
    def _check(message: bytes) -> bytes:
        if isinstance(message, ErrorFrame):
            raise ServerError(message.text)
        return message


# -- command line (muxsrv.client_cli) -----------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``muxsrv-client`` and ``python -m muxsrv.client``: see :mod:`muxsrv.client_cli`."""
    from .client_cli import main as cli_main  # not imported by library users

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
