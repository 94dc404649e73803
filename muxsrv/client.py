"""A blocking client for muxsrv, and ``python -m muxsrv.client`` (``muxsrv-client``).

    with Client("127.0.0.1", 9999) as c:
        c.request(b"hello")                 # -> b"hello" from echo
        c.pipeline([b"a", b"b", b"c"])      # all sent before the replies are read
        c.exec("ls -l")                     # -> ExecResult, from --handler exec

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
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
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
from .handlers.exec_protocol import ExecResult, ReplyError, decode_reply

__all__ = ["Client", "ConnectionClosed", "ExecResult", "ReplyError", "ServerError", "main"]

#: One recv's size (below glibc's default mmap threshold, so it is cheap to allocate) ...
_RECV_SIZE = 64 * 1024
#: ... and the most asked for at once of a large reply's body.
_BODY_RECV_MAX = 4 * 1024 * 1024
#: Seconds to wait for the connection and each reply, unless told otherwise.
DEFAULT_TIMEOUT = 10.0


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

    def abort(self) -> None:
        """Close with a reset: the server drops what it owed this connection, and an
        exec server kills the command it was running for it."""
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
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
            except ConnectionError:
                # Closed or reset early: if the server said why (an error frame, as
                # for a message over its --max-frame), that is the error to raise.
                for reply in (*replies, *self._inbox):
                    self._check(reply)
                raise
            finally:
                self._sock.settimeout(self.timeout)
        return [self._check(r) for r in replies]

    def _receive_some(self) -> None:
        decoder = self._decoder
        want = decoder.want  # inside a large reply: ask for just the rest of its body
        data = self._sock.recv(min(want, _BODY_RECV_MAX) if want else _RECV_SIZE)
        if not data:
            raise ConnectionClosed("the server closed the connection")
        self._inbox.extend(decoder.feed(data))
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
        epilog="With --exec (a server started with --handler exec): like `ssh host COMMAND`, "
        "the remote stdout and stderr go to this stdout and stderr and the exit status is the "
        "command's (killed by signal N: 128+N; timed out: 124; no server or a protocol "
        "error: 255).",
    )
    parser.add_argument("messages", nargs="*", metavar="MESSAGE")
    parser.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9999, help="(default: 9999)")
    parser.add_argument("--framing", choices=FRAMINGS, default="length",
                        help="as the server's (default: length)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the connection and each reply (default: 10; "
                        "with --exec, 10 to connect and no limit on the reply, which the "
                        "server's --exec-timeout bounds)")
    parser.add_argument("--exec", nargs="?", const="", metavar="COMMAND",
                        help="run COMMAND (and any MESSAGE words after it, joined with spaces) "
                        "on an exec server; with no COMMAND, an interactive $ prompt")
    return parser


def _print_reply(reply: bytes) -> None:
    sys.stdout.buffer.write(reply + b"\n")
    sys.stdout.flush()


def _prompt(prompt: str, run: Callable[[str], int]) -> int:
    """An interactive loop (line editing and history); the status of the last line."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    status = 0
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return status
        except KeyboardInterrupt:
            print()
            return 130
        if line.strip():
            status = run(line)


def _request_line(client: Client, line: str) -> int:
    try:
        _print_reply(client.request(line.encode("utf-8", "surrogateescape")))
    except ServerError as exc:
        print(f"server error: {exc.message}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.exec is not None:
        if options.framing != "length":
            parser.error("--exec needs --framing length")
        return _exec_main(options)
    timeout = DEFAULT_TIMEOUT if options.timeout is None else options.timeout
    where = f"{options.host}:{options.port}"
    try:
        with Client(options.host, options.port, options.framing, timeout) as client:
            if not options.messages:
                return _prompt("> ", lambda line: _request_line(client, line))
            status = 0
            for text in options.messages:
                try:
                    _print_reply(client.request(text.encode("utf-8", "surrogateescape")))
                except ServerError as exc:
                    print(f"server error: {exc.message}", file=sys.stderr)
                    status = 1
            return status
    except TimeoutError:
        print(f"muxsrv-client: error: {where}: timed out after {timeout:g} s", file=sys.stderr)
    except ConnectionClosed as exc:
        print(f"muxsrv-client: error: {where}: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"muxsrv-client: error: cannot reach {where}: {exc.strerror or exc}",
              file=sys.stderr)
    except ValueError as exc:
        print(f"muxsrv-client: error: {exc}", file=sys.stderr)
        return 2
    return 1


# -- --exec: like `ssh host COMMAND` ------------------------------------------

#: Exit status for "no server" and protocol errors, as ssh uses it.
EXEC_FAILURE = 255


def _exec_main(options: argparse.Namespace) -> int:
    command = " ".join(word for word in (options.exec, *options.messages) if word)
    where = f"{options.host}:{options.port}"
    try:
        client = Client(options.host, options.port, "length",
                        DEFAULT_TIMEOUT if options.timeout is None else options.timeout)
    except OSError as exc:
        print(f"muxsrv-client: error: cannot reach {where}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXEC_FAILURE
    with client:
        # The server's --exec-timeout bounds the command; ours only if asked for.
        client.timeout = options.timeout
        client._sock.settimeout(options.timeout)
        try:
            if command:
                return _exec_run(client, command)
            return _prompt("$ ", lambda line: _exec_line(client, line))
        except KeyboardInterrupt:
            client.abort()  # the reset tells the server to kill the command
            return 130
        except TimeoutError:
            print(f"muxsrv-client: error: {where}: no reply within {options.timeout:g} s",
                  file=sys.stderr)
        except (ServerError, ReplyError, ConnectionClosed, OSError) as exc:
            print(f"muxsrv-client: error: {where}: {exc}", file=sys.stderr)
    return EXEC_FAILURE


def _exec_run(client: Client, command: str) -> int:
    """Run one command: its stdout to ours, its stderr to ours; return its status."""
    result = client.exec(command)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    if result.timed_out:
        sys.stderr.buffer.write(b"muxsrv-client: timed out (the server's --exec-timeout)\n")
    if result.truncated:
        sys.stderr.buffer.write(b"muxsrv-client: output truncated (--exec-max-output)\n")
    sys.stderr.flush()
    return result.status


def _exec_line(client: Client, line: str) -> int:
    try:
        return _exec_run(client, line)
    except ServerError as exc:
        print(f"muxsrv-client: server error: {exc.message}", file=sys.stderr)
        return EXEC_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
