"""--frame-timeout: a message must be complete within T of its first byte (slowloris)."""

from __future__ import annotations

import logging
import re
import select
import socket
import struct
import time

import pytest
from support import frame, recv_frame, recv_until_eof, running_server, wait_for

from muxsrv.codec import ErrorFrame
from muxsrv.handler import Handler
from muxsrv.limits import LimitSweep, sweep_interval
from muxsrv.loop import EventLoop
from muxsrv.server import Server, Settings
from muxsrv.testing import Harness

HDR = struct.Struct(">I")
T = 30.0
TIMEOUT_TEXT = b"frame timeout: message not complete within 30 s"


def echo(payload: bytes) -> bytes:
    return payload


def swept(h: Harness, timeout: float = T) -> LimitSweep:
    sweep = LimitSweep(h.loop, lambda: [] if h.closed else [h.conn], frame_timeout=timeout)
    # (h.conn.closing: the error frame is out and the lingering close has begun)
    sweep.start()
    return sweep


def test_interval_is_coarse() -> None:
    assert sweep_interval(30) == 1.0
    assert sweep_interval(2) == 0.25
    assert sweep_interval(0) == 1.0
    assert sweep_interval(0.01) == 0.01


@pytest.mark.parametrize("size", [100, 10_000])  # a small frame's tail; a large body's pieces
def test_a_byte_every_half_timeout_does_not_keep_it_alive(
    size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug caught: each byte resetting the deadline (an inactivity timer), so a message
    dripped at one byte per T/2 holds its connection for ever."""
    with Harness(function=echo) as h:
        swept(h)
        start = h.clock.now
        h.peer_sends(HDR.pack(size) + b"a")
        h.run()
        while not h.conn.closing and h.clock.now - start < 5 * T:
            h.advance(T / 2)
            if not h.conn.closing:
                h.peer_sends(b"b")
                h.run()
        assert h.conn.closing
        elapsed = h.clock.now - start
        assert T <= elapsed <= T + T / 2 + 2 * sweep_interval(T)
        assert h.replies() == [ErrorFrame(TIMEOUT_TEXT)]
    assert any(re.fullmatch(r"closing 127\.0\.0\.1:40000: frame timeout: message not complete "
                            r"within 30 s", r.getMessage()) and r.levelno == logging.WARNING
               for r in caplog.records)


def test_closed_between_t_and_t_plus_two_sweeps_of_the_first_byte() -> None:
    """Bug caught: the deadline counted from the last byte, or far later than T."""
    with Harness(function=echo) as h:
        swept(h)
        h.advance(0.5)  # the first byte comes between two sweeps
        start = h.clock.now
        h.peer_sends(HDR.pack(50) + b"x")
        h.run()
        h.advance(T - 0.01)
        assert not h.conn.closing, "closed before T"
        h.advance(2 * sweep_interval(T))
        assert h.conn.closing
        assert h.clock.now - start <= T + 2 * sweep_interval(T)


def test_complete_messages_never_trip_it() -> None:
    """Bug caught: a pipelining client whose every read ends mid-message (but whose
    messages each complete quickly) timed as if one message never finished."""
    with Harness(function=echo) as h:
        swept(h)
        stream = b"".join(frame(b"m%03d" % i) for i in range(400))
        # 7-byte segments: every read ends inside a frame; one segment every 2 s.
        pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]
        got: list[bytes] = []
        for piece in pieces:
            h.peer_sends(piece)
            h.run()
            h.advance(2)
            got += h.replies()
        assert not h.conn.closing
        assert h.clock.now - 1000 > 10 * T  # long past many deadlines
        assert got == [b"m%03d" % i for i in range(400)]


def test_a_message_completed_just_in_time_is_fine_and_the_next_is_timed_afresh() -> None:
    """Bugs caught: closing a message that completes within T; the next message's clock
    started at the previous one's first byte."""
    with Harness(function=echo) as h:
        swept(h)
        h.peer_sends(HDR.pack(3) + b"a")
        h.run()
        h.advance(T - 1.5)
        h.peer_sends(b"bc" + HDR.pack(2) + b"d")  # the end of one, the start of the next
        h.run()
        assert h.replies() == [b"abc"]
        h.advance(T - 1.5)
        assert not h.conn.closing
        h.peer_sends(b"e")
        h.run()
        assert h.replies() == [b"de"]
        h.advance(3 * T)  # nothing partial: nothing to time
        assert not h.conn.closing


def test_line_framing_closes_without_an_error_frame(caplog: pytest.LogCaptureFixture) -> None:
    """Bug caught: an unterminated line dripped for ever; or an error frame written into
    a text stream."""
    with Harness(function=echo, framing="line") as h:
        swept(h)
        h.peer_sends(b"ok\nhalf a li")
        h.run()
        for _ in range(4):
            h.advance(T / 2)
            if not h.conn.closing:
                h.peer_sends(b"n")
                h.run()
        assert h.conn.closing
        assert bytes(h.sock.sent) == b"ok\n"
    assert any("frame timeout: message not complete within 30 s" in r.getMessage()
               for r in caplog.records)


class Pauser(Handler):
    def message_received(self, conn: object, payload: bytes) -> None:
        conn.pause_reading()  # type: ignore[attr-defined]


def test_not_timed_while_the_server_holds_the_input_back() -> None:
    """Bug caught: a client closed for a message the server itself stopped reading."""
    with Harness(Pauser) as h:
        swept(h)
        h.peer_sends(frame(b"first") + HDR.pack(10) + b"half")
        h.run()
        h.advance(3 * T)
        assert not h.conn.closing
        h.conn.resume_reading()
        h.run()
        h.advance(T + 2 * sweep_interval(T))  # its client owes the rest again: timed
        assert h.conn.closing


@pytest.mark.parametrize("handler", ["function", "class"])
def test_not_timed_while_writing_is_paused_for_a_non_reader(handler: str) -> None:
    """Bug caught: a client pipelining complete messages without reading its replies
    closed by the deadline for the partial tail of its last read: the server stopped
    reading it (back-pressure), so the client cannot finish that message."""
    class Echo(Handler):
        def message_received(self, conn: object, payload: bytes) -> None:
            conn.send(payload)  # type: ignore[attr-defined]

    kwargs: dict[str, object] = {"function": echo} if handler == "function" else {}
    with Harness(None if kwargs else Echo, **kwargs) as h:  # type: ignore[arg-type]
        swept(h)
        h.sock.allow(0)  # the client reads nothing
        one = frame(b"e" * 1000)
        # Complete messages, the last read ending inside one (as a 64 KiB recv does).
        stream = one * 2000 + HDR.pack(1000) + b"half"
        h.peer_sends(*(stream[i : i + 65536] for i in range(0, len(stream), 65536)))
        h.run()
        assert h.conn.pending > 1024 * 1024, "back-pressure never started"
        h.advance(3 * T)
        assert not h.conn.closing, "closed for a message the server stopped reading"
        h.sock.allow(None)  # the client reads again: the server reads the rest of the stream
        h.run()
        h.replies()
        h.advance(T - 2)
        assert not h.conn.closing, "the time paused was counted"
        h.advance(2 + 2 * sweep_interval(T))  # now its client owes the rest: timed
        assert h.conn.closing


def test_pausing_stops_the_clock_but_does_not_reset_it() -> None:
    """Bug caught: a client that makes the server pause it (by not reading a burst of
    replies) now and then restarting its partial message's deadline each time, so a
    dripped message lives for ever at the price of an occasional burst."""
    with Harness(function=echo) as h:
        swept(h)
        h.peer_sends(HDR.pack(1000) + b"a")  # a message begun ...
        h.run()
        h.advance(T * 0.75)
        h.sock.allow(0)  # ... then replies it does not read make the server pause it
        h.conn.send(b"r" * (2 * 1024 * 1024))
        h.run()
        h.advance(5 * T)
        assert not h.conn.closing, "timed while the server held its input back"
        h.sock.allow(None)
        h.run()
        h.replies()
        h.advance(T * 0.25 + 3 * sweep_interval(T))
        assert h.conn.closing, "the deadline started again after the pause"


def test_off_with_zero_and_with_raw_framing() -> None:
    loop = EventLoop()
    try:
        assert Server(loop, Settings(framing="raw"), function=echo)._limits.frame_timeout == 0
        assert Server(loop, Settings(frame_timeout=0), function=echo)._limits.frame_timeout == 0
        assert Server(loop, Settings(), function=echo)._limits.frame_timeout == T
    finally:
        loop.close()


# -- real sockets ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_slowloris_on_real_sockets() -> None:
    """Bugs caught: dripping connections never closed (also with an idle timeout the drip
    keeps resetting); closed without the error frame or the log line; good clients
    disturbed."""
    timeout = 1.0
    with running_server("--frame-timeout", "1", "--idle-timeout", "0.5") as srv, \
            srv.connect() as good:
        drips = [srv.connect() for _ in range(4)]
        started = {}
        try:
            for s in drips:
                s.sendall(HDR.pack(1000) + b"x")
                started[s] = time.monotonic()
            ended: dict[socket.socket, float] = {}
            deadline = time.monotonic() + 20
            while len(ended) < len(drips) and time.monotonic() < deadline:
                # The attack's own pace: a byte every 0.2 s, under the idle timeout.
                readable, _, _ = select.select([s for s in drips if s not in ended], [], [], 0.2)
                for s in readable:
                    ended[s] = time.monotonic()
                for s in drips:
                    if s not in ended:
                        try:
                            s.send(b"x")
                        except OSError:
                            ended[s] = time.monotonic()
                good.sendall(frame(b"ping"))
                assert recv_frame(good) == (False, b"ping")
            assert len(ended) == len(drips), "some dripping connections were never closed"
            error = b"frame timeout: message not complete within 1 s"
            for s in drips:
                assert ended[s] - started[s] >= timeout * 0.9
                assert ended[s] - started[s] < timeout + 5  # a loaded machine's slack
                # (the lingering close reads what the drip sent meanwhile: no reset)
                assert recv_until_eof(s) == HDR.pack(0x80000000 | len(error)) + error
            wait_for(lambda: srv.log_count(r"WARNING: closing 127\.0\.0\.1:\d+: frame timeout: "
                                           r"message not complete within 1 s") == len(drips),
                     what="one log line per dripping connection")
            assert srv.log_count("idle for") == 0
            good.sendall(frame(b"after"))
            assert recv_frame(good) == (False, b"after")
        finally:
            for s in drips:
                s.close()
