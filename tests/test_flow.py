"""Bytes on real sockets: pipelining, fragments, partial sends, flow control, half-close.

Every test runs a real server process on 127.0.0.1 (ephemeral port) and talks
to it with plain sockets and the independent frame helpers in support.py, not
with muxsrv's own codecs, so a codec bug cannot hide a server bug.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable

import pytest
from support import (
    PLUGINS,
    frame,
    plugin_env,
    recv_exact,
    recv_frame,
    recv_until_eof,
    running_server,
    wait_for,
)

MiB = 1 << 20


class Writer(threading.Thread):
    """Sends messages from a thread, so the test can read (or not) meanwhile."""

    def __init__(self, sock: socket.socket, count: int, make: Callable[[int], bytes]) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.count = count
        self.make = make
        self.sent_bytes = 0
        self.sent_messages = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.count):
                data = self.make(i)
                if data:
                    self.sock.sendall(data)
                self.sent_bytes += len(data)
                self.sent_messages += 1
        except BaseException as exc:
            self.error = exc


def frames_then_shutdown(sock: socket.socket, messages: list[bytes]) -> Writer:
    """A Writer that sends each message framed, then shuts down the write side."""

    def make(i: int) -> bytes:
        if i == len(messages):
            sock.shutdown(socket.SHUT_WR)
            return b""
        return frame(messages[i])

    return Writer(sock, len(messages) + 1, make)


def recv_line(sock: socket.socket) -> bytes:
    """One reply line (byte at a time: only for short line-framing tests)."""
    out = bytearray()
    while not out.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            raise ConnectionError(f"EOF after {bytes(out)!r}")
        out += b
    return bytes(out)


def connect_small(address: tuple[str, int], rcvbuf: int, sndbuf: int = 0) -> socket.socket:
    """Connect with small socket buffers (set before connect: after it, Linux
    shrinks the window under a scale already agreed, and the transfer crawls)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(30)
    sock.connect(address)
    return sock


def assert_eof(sock: socket.socket) -> None:
    """The server closed cleanly: EOF, not a reset, and nothing else first."""
    assert sock.recv(65536) == b""


# -- pipelining and fragments ------------------------------------------------------


@pytest.mark.timeout(60)
def test_pipelined_requests_are_answered_in_order() -> None:
    """Bug caught: only the first message of a recv handled, or replies reordered/merged."""
    rng = random.Random(2)
    messages = [rng.randbytes(rng.choice([0, 1, 5, 100, 4095, 4096, 9000])) for _ in range(600)]
    with running_server("--handler", "echo") as srv, srv.connect() as sock:
        writer = Writer(sock, 1, lambda _: b"".join(frame(m) for m in messages))
        writer.start()
        for i, m in enumerate(messages):
            assert recv_frame(sock) == (False, m), f"reply {i}"
        writer.join(10)
        assert writer.error is None


@pytest.mark.timeout(60)
def test_pipelined_lines_lf_and_crlf() -> None:
    with running_server("--handler", "upper", "--framing", "line") as srv, srv.connect() as sock:
        sock.sendall(b"one\ntwo\r\n\nthr\ree\r\n")
        want = b"ONE\nTWO\n\nTHR\rEE\n"
        assert recv_exact(sock, len(want)) == want


@pytest.mark.timeout(60)
@pytest.mark.parametrize("framing", ["length", "line"])
def test_one_byte_fragments(framing: str) -> None:
    """Bug caught: a header, terminator or body split across recvs mis-parsed or stalled.

    Each message goes one byte per send (TCP_NODELAY, so one segment each) and
    its reply must come back before the next message starts: a server that
    waits for more data than the message needs fails here.
    """
    sizes = [0, 1, 3, 4, 5, 4095, 4096, 4097]
    with running_server("--handler", "upper", "--framing", framing) as srv, srv.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n in sizes:
            payload = (b"ab\xc3" * n)[:n]
            data = frame(payload) if framing == "length" else payload + b"\r\n"
            for i in range(len(data)):
                sock.send(data[i : i + 1])
            want = payload.upper()
            if framing == "length":
                assert recv_frame(sock) == (False, want), n
            else:
                assert recv_line(sock) == want + b"\n", n


@pytest.mark.timeout(60)
def test_partial_sends_and_receives_with_tiny_socket_buffers() -> None:
    """Bug caught: the unsent remainder of a partial send dropped, duplicated or reordered.

    The client's receive window is a few KiB, so nearly every server send is
    partial, across frame boundaries and in the middle of large frames; the
    client's small send buffer makes the server's receives small too.
    """
    rng = random.Random(3)
    messages = [rng.randbytes(rng.choice([0, 7, 1000, 70000, 3 * MiB])) for _ in range(40)]
    with (
        running_server("--handler", "echo") as srv,
        connect_small(srv.address, rcvbuf=4096, sndbuf=4096) as sock,
    ):
        writer = Writer(sock, len(messages), lambda i: frame(messages[i]))
        writer.start()
        for i, m in enumerate(messages):
            header = recv_exact(sock, 4)
            assert int.from_bytes(header, "big") == len(m), f"reply {i} header"
            got = bytearray()
            while len(got) < len(m):
                chunk = sock.recv(min(4096, len(m) - len(got)))
                assert chunk, f"EOF in reply {i}"
                got += chunk
            assert got == m, f"reply {i} differs"
        writer.join(10)
        assert writer.error is None


# -- flow control: the slow reader ------------------------------------------------

#: Message sizes the slow-reader client cycles through: both codec paths (small
#: frames sliced out of what one recv returned, large ones received in pieces).
SLOW_SIZES = (8, 300, 4095, 4096, 5000, 65536, 200_000, MiB)
SLOW_TOTAL = 256 * MiB
#: How far the server's RSS may grow while its client pipelines without reading.
RSS_GROWTH_LIMIT = 100 * MiB
_BULK = random.Random(4).randbytes(2 * MiB)


def slow_message(i: int) -> bytes:
    size = SLOW_SIZES[i % len(SLOW_SIZES)]
    offset = (i * 4099) % MiB
    return i.to_bytes(8, "big") + _BULK[offset : offset + size - 8]


@pytest.mark.timeout(180)
def test_slow_reader_bounds_server_memory_and_loses_nothing() -> None:
    """Bug caught: no flow control (server buffers every reply for a client that is not
    reading: RSS grows by the whole 256 MiB), or replies lost/reordered on resume."""
    count = 0
    total = 0
    while total < SLOW_TOTAL:
        total += len(slow_message(count)) + 4
        count += 1
    with running_server("--handler", "echo", "--idle-timeout", "0") as srv:
        with srv.connect(timeout=60) as warm:  # imports and first-use allocations
            warm.sendall(frame(b"x" * MiB))
            recv_frame(warm)
        base = srv.rss_bytes()
        peak = base

        def sample() -> int:
            nonlocal peak
            peak = max(peak, srv.rss_bytes())
            return peak

        with srv.connect(timeout=60) as sock:
            writer = Writer(sock, count, lambda i: frame(slow_message(i)))
            writer.start()
            # Phase 1: do not read; wait until the writer is stuck (the server stopped reading).
            progress = {"bytes": -1, "since": time.monotonic()}

            def stalled() -> bool:
                sample()
                if writer.sent_bytes != progress["bytes"]:
                    progress["bytes"], progress["since"] = writer.sent_bytes, time.monotonic()
                    return False
                return not writer.is_alive() or time.monotonic() - progress["since"] > 0.5

            wait_for(stalled, timeout=60, interval=0.02, what="the writer to stall")
            assert writer.error is None
            assert writer.sent_messages < count, "the server took all 256 MiB without a reader"
            assert peak - base < RSS_GROWTH_LIMIT, f"RSS grew {(peak - base) / MiB:.0f} MiB"
            # Phase 2: read everything, byte-exact and in order, still watching memory.
            for i in range(count):
                is_error, payload = recv_frame(sock)
                if payload != slow_message(i) or is_error:
                    pytest.fail(f"reply {i} differs (error frame: {is_error})")
                if i % 16 == 0:
                    sample()
            writer.join(30)
            assert writer.error is None and writer.sent_messages == count
        assert sample() - base < RSS_GROWTH_LIMIT, f"RSS grew {(peak - base) / MiB:.0f} MiB"


# -- half-close ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_half_close_still_gets_every_reply() -> None:
    """Bug caught: the server treating EOF as the end and dropping replies it owes.

    The client sends 16 MiB then shuts its write side, and reads slowly (a small
    receive buffer): when the server reads the EOF it still owes replies.
    """
    bulk = [b"%06d" % i + b"x" * (64 * 1024 - 6) for i in range(256)]
    messages = [b"a", b"", *bulk, b"last"]
    with running_server("--handler", "upper") as srv:
        sock = connect_small(srv.address, rcvbuf=8192)

        writer = frames_then_shutdown(sock, messages)
        writer.start()
        with sock:
            for i, m in enumerate(messages):
                assert recv_frame(sock) == (False, m.upper()), f"reply {i}"
            assert_eof(sock)
        writer.join(10)
        assert writer.error is None


@pytest.mark.timeout(60)
def test_replies_owed_when_eof_arrives_are_delivered() -> None:
    """Bug caught: output still queued in the server when it reads the peer's EOF dropped.

    The client sends 8 MiB and shuts its write side.  The server stops reading
    when over 1 MiB of replies is queued, and reads on (to the EOF) only once
    the client has read enough; reading 4 KiB at a time until the handler logs
    the EOF guarantees that replies are still queued at that moment.
    """
    messages = [b"%06d" % i + b"m" * (64 * 1024 - 6) for i in range(128)]
    with running_server("--handler", f"{PLUGINS}:Tracer", env=plugin_env()) as srv:
        sock = connect_small(srv.address, rcvbuf=4096)

        writer = frames_then_shutdown(sock, messages)
        writer.start()
        with sock:
            got = bytearray()
            deadline = time.monotonic() + 30
            while not srv.log_count("eof received by tracer"):
                assert time.monotonic() < deadline, "the server never read the EOF"
                chunk = sock.recv(4096)
                assert chunk, "EOF before the server read ours"
                got += chunk
            got += recv_until_eof(sock)
        writer.join(10)
        assert writer.error is None
        expect = b"".join(frame(m) for m in messages)
        assert got[: len(expect)] == expect
        assert got[len(expect) + 4 :].endswith(b" eof")


@pytest.mark.timeout(60)
def test_half_close_answers_an_unterminated_last_line() -> None:
    """Bug caught: the last line of a stream that ends without a newline never answered."""
    with running_server("--handler", "upper", "--framing", "line") as srv, srv.connect() as sock:
        sock.sendall(b"first\nno newline")
        sock.shutdown(socket.SHUT_WR)
        assert recv_exact(sock, 17) == b"FIRST\nNO NEWLINE\n"
        assert_eof(sock)


# -- many connections -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_2000_concurrent_connections_all_answered() -> None:
    """Bug caught: a connection starved or lost under load (accept batching, fd handling)."""
    n = 2000
    with running_server("--handler", "echo") as srv:
        socks: list[socket.socket] = []
        try:
            for _ in range(n):
                socks.append(srv.connect(timeout=30))
            for i, s in enumerate(socks):
                s.sendall(frame(b"conn %d" % i))
            for i, s in enumerate(socks):
                assert recv_frame(s) == (False, b"conn %d" % i)
            # All 2,000 open at once: the server holds one descriptor for each.
            assert srv.open_fds() >= n
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: srv.open_fds() < 100, timeout=30, what="connections closed")
