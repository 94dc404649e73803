"""A blocking client for muxsrv, and ``python -m muxsrv.client`` (``muxsrv-client``).

    with Client("127.0.0.1", 9999) as c:
        c.request(b"hello")                 # -> b"hello" from echo
        c.pipeline([b"a", b"b", b"c"])      # all sent before the replies are read

It frames with the same sans-IO codecs as the server.  An error frame from the
server raises :class:`ServerError` carrying the server's message; the end of
the connection raises :class:`ConnectionClosed`; timeouts raise
``TimeoutError``.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from types import TracebackType

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

__all__ = ["Client", "ConnectionClosed", "ServerError", "main"]

_RECV_SIZE = 256 * 1024


class ServerError(Exception):
    """The server answered with an error frame; ``message`` is its text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectionClosed(ConnectionError):
    """The server closed the connection before the expected reply."""


class Client:
    """One connection to a muxsrv server (not thread-safe)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9999,
        framing: str = "length",
        timeout: float | None = 10.0,
        max_frame: int = MAX_FRAME_LIMIT,
    ) -> None:
        if framing not in FRAMINGS:
            raise ValueError(f"unknown framing {framing!r}; choose from {', '.join(FRAMINGS)}")
        self.framing = framing
        self.timeout = timeout
        self._encode = ENCODERS[framing]
        self._decoder: Decoder = (
            LengthDecoder(max_frame, accept_errors=True)
            if framing == "length"
            else make_decoder(framing, max_frame)
        )
        self._scratch = bytearray(_RECV_SIZE)
        self._inbox: deque[bytes] = deque()
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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

    def shutdown_write(self) -> None:
        """Tell the server we send no more (it still delivers every reply)."""
        self._sock.shutdown(socket.SHUT_WR)

    def encode(self, payload: Buffer) -> bytes:
        if self.framing == "line" and b"\n" in bytes(payload):
            raise ValueError("with line framing a message cannot contain a newline")
        out: list[Buffer] = []
        self._encode(out, payload)
        return b"".join(out)

    def send(self, payload: Buffer) -> None:
        """Send one message."""
        self._sock.sendall(self.encode(payload))

    def recv(self) -> bytes:
        """The next reply; raises ServerError for an error frame."""
        while not self._inbox:
            self._receive_some()
        return self._check(self._inbox.popleft())

    def request(self, payload: Buffer) -> bytes:
        """Send one message and return its reply."""
        self.send(payload)
        return self.recv()

    def pipeline(self, payloads: Iterable[Buffer]) -> list[bytes]:
        """Send every message without waiting, then collect one reply per message.

        Sending and receiving interleave, so a pipeline larger than the socket
        buffers cannot deadlock against the server's flow control.  An error
        frame raises ServerError after all replies have been read.
        """
        if self.framing == "raw":
            raise ValueError("pipeline() needs length or line framing: raw has no boundaries")
        items = list(payloads)
        count = len(items)
        data = memoryview(b"".join(self.encode(p) for p in items))
        replies: list[bytes] = []
        with selectors.DefaultSelector() as sel:
            self._sock.setblocking(False)
            try:
                sel.register(self._sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
                while data or len(self._inbox) + len(replies) < count:
                    while self._inbox and len(replies) < count:
                        replies.append(self._inbox.popleft())
                    if not data and len(replies) >= count:
                        break
                    if not data:
                        sel.modify(self._sock, selectors.EVENT_READ)
                    ready = sel.select(self.timeout)
                    if not ready:
                        raise TimeoutError(f"no reply within {self.timeout} s")
                    mask = ready[0][1]
                    if mask & selectors.EVENT_WRITE and data:
                        with contextlib.suppress(BlockingIOError):
                            data = data[self._sock.send(data) :]
                    if mask & selectors.EVENT_READ:
                        with contextlib.suppress(BlockingIOError):
                            self._receive_some()
                while self._inbox and len(replies) < count:
                    replies.append(self._inbox.popleft())
            finally:
                self._sock.settimeout(self.timeout)
        return [self._check(r) for r in replies]

    def _receive_some(self) -> None:
        decoder = self._decoder
        nbytes = self._sock.recv_into(decoder.get_buffer(self._scratch))
        if nbytes == 0:
            raise ConnectionClosed("the server closed the connection")
        self._inbox.extend(decoder.buffer_updated(nbytes))
        if decoder.error is not None:
            raise ConnectionClosed(f"bad data from the server: {decoder.error}")

    @staticmethod
    def _check(message: bytes) -> bytes:
        if isinstance(message, ErrorFrame):
            raise ServerError(message.text)
        return message


# -- command line ---------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muxsrv-client",
        description="Send each MESSAGE to a muxsrv server and print each reply on its own "
        "line; with no MESSAGE, an interactive prompt.",
    )
    parser.add_argument("messages", nargs="*", metavar="MESSAGE")
    parser.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9999, help="(default: 9999)")
    parser.add_argument("--framing", choices=FRAMINGS, default="length",
                        help="as the server's (default: length)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the connection and each reply (default: 10)")
    return parser


def _print_reply(reply: bytes) -> None:
    sys.stdout.buffer.write(reply + b"\n")
    sys.stdout.flush()


def _interactive(client: Client) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    status = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return status
        except KeyboardInterrupt:
            print()
            return 130
        try:
            _print_reply(client.request(line.encode("utf-8", "surrogateescape")))
        except ServerError as exc:
            print(f"server error: {exc.message}", file=sys.stderr)
            status = 1


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    where = f"{options.host}:{options.port}"
    try:
        with Client(options.host, options.port, options.framing, options.timeout) as client:
            if not options.messages:
                return _interactive(client)
            status = 0
            for text in options.messages:
                try:
                    _print_reply(client.request(text.encode("utf-8", "surrogateescape")))
                except ServerError as exc:
                    print(f"server error: {exc.message}", file=sys.stderr)
                    status = 1
            return status
    except TimeoutError:
        print(f"muxsrv-client: error: {where}: timed out after {options.timeout:g} s",
              file=sys.stderr)
    except ConnectionClosed as exc:
        print(f"muxsrv-client: error: {where}: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"muxsrv-client: error: cannot reach {where}: {exc.strerror or exc}",
              file=sys.stderr)
    except ValueError as exc:
        print(f"muxsrv-client: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
