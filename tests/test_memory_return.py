"""Memory given back after an attack: RSS within 64 MiB of before within 10 s (issue 11, 4).

The allocator keeps freed buffers for speed (``muxsrv.tuning``); the limits'
sweep gives them back once what the connections hold has dropped a lot
(``muxsrv.limits.MemoryReturn``).  Tested by its rule with plain numbers, by
the sweep with a fake server, and with a real server process under a drip and
partial-frame attack.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import pytest
from support import frame, recv_frame, running_server, wait_for
from test_conns_per_ip import fake_server

import muxsrv.server
from muxsrv.limits import RELEASE_DROP, MemoryReturn

HDR = struct.Struct(">I")
KiB, MiB = 1 << 10, 1 << 20


def test_released_once_after_a_large_drop_never_while_steady_or_growing() -> None:
    """Bugs caught: trimming on every pass (a steady server paying for it), never, or
    again and again after one drop."""
    calls: list[int] = []
    memory = MemoryReturn(lambda: calls.append(1))
    for held in (0, 10 * MiB, 200 * MiB, 200 * MiB, 190 * MiB, 200 * MiB):
        memory.update(held)
    assert calls == []  # growing, steady, small dips
    memory.update(200 * MiB - RELEASE_DROP)
    assert calls == [1]
    for _ in range(5):
        memory.update(200 * MiB - RELEASE_DROP)  # the new level: nothing more to give
    memory.update(1 * MiB)
    assert calls == [1, 1]
    assert memory.releases == 2


def test_the_sweep_gives_memory_back_when_attackers_leave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bug caught: the sweep never giving back what closed connections held (the peak of
    an attack kept for ever), or giving it back while they still hold it."""
    released: list[float] = []
    monkeypatch.setattr(muxsrv.server, "release_free_memory", lambda: released.append(1))
    with fake_server(frame_timeout=0) as fs:
        fs.server._limits.start()
        piece = b"a" * (64 * KiB)
        bad = [fs.connect(f"10.0.0.{i}", HDR.pack(16 * MiB), *[piece] * 160) for i in range(5)]
        fs.advance(3.5)  # 50 MiB held: passes, no release
        assert released == []
        for s in bad:
            s.peer_resets()
        fs.run()
        assert not fs.server._conns
        fs.advance(1.1)
        assert released == [1]
        fs.advance(5)
        assert released == [1]


# -- a real server process ---------------------------------------------------------------


def drip_and_flood(srv: object, good: socket.socket, seconds: float) -> list[socket.socket]:
    """10 connections dripping 4 MB bodies a byte per segment, and 24 sending 6 MiB of
    16 MiB frames in 64 KiB pieces, for ``seconds``; the good client answered meanwhile."""
    drips = [srv.connect() for _ in range(10)]  # type: ignore[attr-defined]
    floods = [srv.connect() for _ in range(24)]  # type: ignore[attr-defined]
    for s in drips:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HDR.pack(4_000_000))
        s.setblocking(False)
    for s in floods:
        s.sendall(HDR.pack(16 * MiB - 1))
        s.setblocking(False)
    piece = b"f" * (64 * KiB)
    sent = [0] * len(floods)
    end = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < end and rounds < 100_000:
        rounds += 1
        for s in drips:
            for _ in range(20):
                with contextlib.suppress(BlockingIOError):
                    s.send(b"d")
        for i, s in enumerate(floods):
            if sent[i] < 6 * MiB:
                with contextlib.suppress(BlockingIOError):
                    sent[i] += s.send(piece)
        if rounds % 50 == 0:
            good.sendall(frame(b"ping"))
            assert recv_frame(good) == (False, b"ping")
    assert sum(sent) > 100 * MiB, "the flood did not get through"
    return drips + floods


@pytest.mark.timeout(90)
def test_rss_back_within_64_mib_of_before_within_10_s_after_an_attack() -> None:
    """Bug caught: the drip and partial-frame attack's peak kept resident after the
    attackers left (the allocator's thresholds keep freed buffers mapped)."""
    with running_server("--frame-timeout", "0") as srv, srv.connect() as good:
        good.sendall(frame(b"warm"))
        assert recv_frame(good) == (False, b"warm")
        before = srv.rss_bytes()
        attackers = drip_and_flood(srv, good, seconds=4)
        peak = srv.rss_bytes()
        assert peak > before + 100 * MiB, f"the attack held too little to tell: {peak >> 20} MiB"
        ended = time.monotonic()
        for s in attackers:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset: the attack ends at once
        wait_for(lambda: srv.rss_bytes() <= before + 64 * MiB, timeout=10,
                 what=f"RSS back within 64 MiB of {before >> 20} MiB "
                      f"(peak {peak >> 20} MiB, now {srv.rss_bytes() >> 20} MiB)")
        assert time.monotonic() - ended <= 10.5
        good.sendall(frame(b"after"))
        assert recv_frame(good) == (False, b"after")
