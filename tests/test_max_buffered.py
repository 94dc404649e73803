"""--max-buffered: a global budget for large unfinished messages; attackers closed, not the good."""

from __future__ import annotations

import contextlib
import logging
import struct

import pytest
from support import frame, recv_frame, recv_until_eof, running_server
from test_conns_per_ip import fake_server, replies

from muxsrv.codec import ErrorFrame
from muxsrv.connection import OVER_BUDGET

HDR = struct.Struct(">I")
KiB, MiB = 1 << 10, 1 << 20
PIECE = b"a" * (64 * KiB)


def attack(size: int = 8 * MiB, pieces: int = 40) -> list[bytes]:
    """A large frame announced, then ``pieces`` 64 KiB segments of it (never finished)."""
    return [HDR.pack(size)] + [PIECE] * pieces


def test_over_the_budget_the_holder_stalls_then_is_closed_and_small_messages_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bugs caught: a large partial message growing without a global bound; good clients
    sending small messages stalled with it; the stalled attacker never closed; the budget
    not given back when it is."""
    with fake_server(max_buffered=MiB, frame_timeout=0) as fs:
        server = fs.server
        budget = server.input_budget
        assert budget is not None
        server._limits.start()
        bad = fs.connect("10.0.0.1", *attack())
        good = fs.connect("10.0.0.2", frame(b"small"))
        assert replies(good) == [b"small"]
        assert budget.stalled == 1
        assert budget.total <= MiB + 2 * len(PIECE)  # within the budget plus a read
        assert len(bad._segments) > 20  # the rest left unread, in the kernel (its window)
        good.peer_sends(frame(b"still served"))
        fs.run()
        assert replies(good) == [b"small", b"still served"]
        fs.advance(1.5)  # the sweep
        assert replies(bad) == [ErrorFrame(OVER_BUDGET.encode())]
        assert budget.total == 0 and budget.stalled == 0
        good.peer_sends(frame(b"after"))
        fs.run()
        assert replies(good)[-1] == b"after"
    assert any(r.levelno == logging.WARNING and r.getMessage().startswith("closing 10.0.0.1:")
               and "over --max-buffered (1048576 bytes)" in r.getMessage()
               for r in caplog.records)


def test_the_largest_holders_are_closed_a_smaller_large_message_completes() -> None:
    """Bug caught: closing whoever was stalled last (a good client's 200 KiB upload) instead
    of the connections holding the most."""
    with fake_server(max_buffered=MiB, frame_timeout=0) as fs:
        server = fs.server
        budget = server.input_budget
        assert budget is not None
        server._limits.start()
        bad1 = fs.connect("10.0.0.1", *attack())
        bad2 = fs.connect("10.0.0.2", *attack())
        upload = b"u" * (200 * KiB)
        data = frame(upload)
        good = fs.connect("10.0.0.3", *[data[i : i + 65536] for i in range(0, len(data), 65536)])
        for _ in range(10):
            fs.advance(1.1)
        assert replies(good) == [upload]
        error = [ErrorFrame(OVER_BUDGET.encode())]
        assert replies(bad1) == error and replies(bad2) == error
        assert budget.total == 0 and budget.stalled == 0


def test_a_quiet_holder_is_closed_not_the_newcomer_it_stalled() -> None:
    """Bug caught: only stalled connections were candidates, so an attacker that sent most
    of a large frame and then went quiet (never asking to read more, never stalled) kept
    its bytes, and the budget closed the good client that next tried to read a body,
    holding a few KiB: the wrong victim, and nothing freed."""
    with fake_server(max_buffered=MiB, frame_timeout=0) as fs:
        server = fs.server
        budget = server.input_budget
        assert budget is not None
        server._limits.start()
        quiet = fs.connect("10.0.0.1", *attack(pieces=15))  # 960 KiB held, then silence
        assert budget.stalled == 0 and budget.total > 800 * KiB
        upload = b"u" * (300 * KiB)
        data = frame(upload)
        good = fs.connect("10.0.0.2", *[data[i : i + 65536] for i in range(0, len(data), 65536)])
        assert budget.stalled == 1  # the newcomer, over the budget
        for _ in range(3):
            fs.advance(1.1)
        assert replies(quiet) == [ErrorFrame(OVER_BUDGET.encode())]
        assert replies(good) == [upload]
        assert budget.total == 0 and budget.stalled == 0


def test_small_partials_and_off() -> None:
    """Small frames never meet the budget; 0 turns it off."""
    with fake_server(max_buffered=0) as fs:
        assert fs.server.input_budget is None
        fs.connect("10.0.0.1", *attack(pieces=30))
        assert fs.server._conns  # read on, unbounded (as asked)
    with fake_server(max_buffered=64 * KiB) as fs:
        budget = fs.server.input_budget
        assert budget is not None
        socks = [fs.connect(f"10.0.0.{i}", HDR.pack(4000) + b"x" * 3000) for i in range(40)]
        assert budget.total == 0 and budget.stalled == 0  # 40 x 3 KB held, none counted
        for s in socks:
            s.peer_sends(b"y" * 1000)
        fs.run()
        assert all(replies(s) == [b"x" * 3000 + b"y" * 1000] for s in socks)


@pytest.mark.timeout(90)
def test_partial_frame_flood_on_real_sockets() -> None:
    """Bugs caught: server memory following the attackers' partial frames (+715 MiB for
    50 x 15 MB today); good clients not served; attackers not told."""
    with running_server("--max-buffered", "8M", "--frame-timeout", "0") as srv, \
            srv.connect() as good:
        base = srv.rss_bytes()
        bad = [srv.connect() for _ in range(6)]
        try:
            for s in bad:
                s.sendall(HDR.pack(16 * MiB - 1))
                s.setblocking(False)
            chunk = b"z" * (256 * KiB)
            sent = [0] * len(bad)
            for _ in range(200):  # each tries to send 12 MiB; the stalled ones cannot
                for i, s in enumerate(bad):
                    if sent[i] < 12 * MiB:
                        with contextlib.suppress(OSError):  # (BlockingIOError: stalled)
                            sent[i] += s.send(chunk)
                good.sendall(frame(b"ping"))
                assert recv_frame(good) == (False, b"ping")
            srv.wait_log(r"WARNING: closing 127\.0\.0\.1:\d+: \d+ bytes of an unfinished message "
                         r"held while the server is over --max-buffered", timeout=30)
            assert srv.rss_bytes() - base < 48 * MiB
            closed = 0
            for s in bad:
                s.setblocking(True)
                s.settimeout(0.2)
                try:
                    data = recv_until_eof(s)
                except (TimeoutError, ConnectionResetError):
                    continue
                text = OVER_BUDGET.encode()
                assert data == HDR.pack(0x80000000 | len(text)) + text
                closed += 1
            assert closed >= 1
            good.sendall(frame(b"after"))
            assert recv_frame(good) == (False, b"after")
        finally:
            for s in bad:
                s.close()
