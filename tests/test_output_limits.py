"""--max-output, --output-soft-limit/--output-soft-seconds: output a client does not read."""

from __future__ import annotations

import logging
import re
import socket
import sys

import pytest
from support import PLUGIN_DIR, frame, plugin_env, recv_frame, running_server, wait_for

from muxsrv.handler import Conn, Handler
from muxsrv.limits import LimitSweep, sweep_interval
from muxsrv.testing import Harness
from muxsrv.transport import HIGH_WATER

sys.path.insert(0, str(PLUGIN_DIR))
from muxsrv_testplugins.pushers import CHUNK, INTERVAL, Pusher

MiB = 1 << 20


def dropped_lines(caplog: pytest.LogCaptureFixture, limit: str) -> list[logging.LogRecord]:
    rx = re.compile(r"closing 127\.0\.0\.1:40000: \d+ bytes of output queued, " + re.escape(limit))
    return [r for r in caplog.records if rx.fullmatch(r.getMessage())]


def test_hard_limit_drops_a_non_reader_as_the_queue_grows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bugs caught: a handler pushing without input to a client that reads nothing grows
    the server without bound; the drop not logged; more than one push over the limit."""
    with Harness(Pusher) as h:
        h.max_output = 2 * MiB  # type: ignore[attr-defined]  # (the server's Settings.max_output)
        h.sock.allow(0)  # the client reads nothing: the kernel takes nothing
        pushes = 0
        while not h.closed and pushes < 1000:
            h.advance(INTERVAL)
            pushes += 1
            assert h.conn.pending <= 2 * MiB + len(frame(CHUNK))
        assert h.closed == 1  # dropped at once: an abort, no lingering
        assert pushes == 2 * MiB // len(frame(CHUNK)) + 1  # the first push past the limit
        assert h.sock.closed and not h.sock.shut_wr
    lines = dropped_lines(caplog, "over --max-output (2097152 bytes)")
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING


def test_the_sweep_catches_a_connection_whose_queue_does_not_grow() -> None:
    """Bug caught: the hard limit checked only when output is queued (a connection over it
    that receives nothing and queues nothing more never dropped)."""
    with Harness(Pusher) as h:  # (no max_output on this owner: only the sweep knows it)
        h.sock.allow(0)
        h.advance(INTERVAL * 20.5)
        pending = h.conn.pending
        assert pending >= 20 * len(CHUNK)
        h.conn.close()  # closing: no more pushes, the queue stands still
        sweep = LimitSweep(h.loop, lambda: [] if h.closed else [h.conn], max_output=MiB)
        sweep.start()
        h.advance(sweep.interval * 1.5)
        assert h.closed == 1


class Burst(Handler):
    """Queues ``size`` bytes at once when told (a timer), then nothing."""

    size = 0

    def connection_made(self, conn: Conn) -> None:
        self.conn = conn

    def burst(self, size: int) -> None:
        self.conn.send(b"b" * size)


def test_soft_limit_drops_after_its_seconds_over_it(caplog: pytest.LogCaptureFixture) -> None:
    """Bugs caught: the soft limit never enforced; enforced at once (not after S seconds);
    the clock not restarted once the client caught up."""
    seconds = 10.0
    with Harness(Burst) as h:
        handler = h.handler
        assert isinstance(handler, Burst)
        sweep = LimitSweep(h.loop, lambda: [] if h.closed else [h.conn], soft_limit=MiB,
                           soft_seconds=seconds)
        sweep.start()
        h.sock.allow(0)
        # Over it for less than S, then the client catches up: not dropped.
        handler.burst(2 * MiB)
        h.advance(seconds - 2 * sweep.interval)
        assert not h.closed
        h.sock.allow(None)  # the client reads it all
        h.run()
        assert h.conn.pending == 0
        h.sock.allow(0)  # ... and then nothing again
        h.advance(2 * seconds)
        assert not h.closed
        # Over it again: S from now, not from the first time.
        start = h.clock.now
        handler.burst(MiB + 1)
        h.advance(seconds - 2 * sweep.interval)
        assert not h.closed
        h.advance(3 * sweep.interval)
        assert h.closed == 1
        assert seconds <= h.clock.now - start <= seconds + 2 * sweep_interval(seconds)
    assert len(dropped_lines(caplog, f"over --output-soft-limit ({MiB} bytes) for 10 s")) == 1


def test_under_the_soft_limit_nothing_happens() -> None:
    with Harness(Burst) as h:
        handler = h.handler
        assert isinstance(handler, Burst)
        LimitSweep(h.loop, lambda: [h.conn], soft_limit=MiB, soft_seconds=1).start()
        h.sock.allow(0)
        handler.burst(MiB - 4)  # at the limit (with its length prefix), not over it
        h.advance(10)
        assert not h.closed and h.conn.pending == MiB


def test_back_pressure_is_not_an_output_limit() -> None:
    """Bug caught: a client pipelining requests without reading dropped (back-pressure
    holds it at about HIGH_WATER; that is the server working, not an attack to punish)."""
    with Harness(function=lambda p: p) as h:
        h.max_output = 2 * MiB  # type: ignore[attr-defined]
        h.sock.allow(0)
        for _ in range(64):
            h.peer_sends(frame(b"x" * 65536))
        h.run()
        assert not h.closed
        assert HIGH_WATER < h.conn.pending < 2 * MiB


# -- real sockets ---------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_hard_limit_on_real_sockets() -> None:
    """Bugs caught: the server's memory following what a handler pushes to a client that
    reads nothing; no log line; the server not answering others afterwards."""
    with running_server("--handler", "muxsrv_testplugins.pushers:Pusher", "--max-output", "4M",
                        env=plugin_env()) as srv:
        base = srv.rss_bytes()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect
        sock.connect(srv.address)
        try:
            line = srv.wait_log(r"WARNING: closing 127\.0\.0\.1:\d+: \d+ bytes of output queued, "
                                r"over --max-output \(4194304 bytes\)", timeout=60)
            queued = int(re.search(r"(\d+) bytes of output", line).group(1))  # type: ignore[union-attr]
            assert 4 * MiB < queued <= 4 * MiB + len(frame(CHUNK))
            assert srv.rss_bytes() - base < 32 * MiB
            sock.settimeout(10)
            received = 0
            try:  # dropped: what the kernel holds, then the end (no 4 MiB more)
                while chunk := sock.recv(1 << 20):
                    received += len(chunk)
            except ConnectionResetError:
                pass
            assert received < 32 * MiB
        finally:
            sock.close()
        with srv.connect() as fresh:
            fresh.sendall(frame(b"still here"))
            while True:  # (the pusher's own output comes first)
                is_error, payload = recv_frame(fresh)
                if payload == b"still here":
                    break
                assert payload == CHUNK and not is_error
        wait_for(lambda: srv.log_count("over --max-output") == 1, what="one drop only")
