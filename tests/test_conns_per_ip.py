"""--max-conns-per-ip: connection N+1 from one address is refused; the count never leaks."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from support import frame, recv_frame, recv_until_eof, running_server, wait_for

from muxsrv.codec import ErrorFrame
from muxsrv.framing import MAX_FRAME_LIMIT, LengthDecoder
from muxsrv.limits import AddressCounts, address_key
from muxsrv.loop import EventLoop
from muxsrv.proxying import Proxying
from muxsrv.server import Server, Settings
from muxsrv.stages.proxy import v1_header
from muxsrv.testing import FakeClock, FakeSelector, FakeSocket

REFUSED = b"too many connections from your address (limit 2)"


def echo(payload: bytes) -> bytes:
    return payload


class FakeServer:
    """A real Server on a real loop, over fake sockets and a fake clock (never listens)."""

    def __init__(self, **settings: Any) -> None:
        proxying = settings.pop("proxying", None)
        self.clock = FakeClock()
        self.selector = FakeSelector(self.clock)
        self.loop = EventLoop(selector=self.selector, clock=self.clock)
        self.server = Server(self.loop, Settings(**settings), function=echo, proxying=proxying)

    def connect(self, host: str, *data: bytes) -> FakeSocket:
        sock = FakeSocket((host, 40000 + len(self.server._conns)))
        sock.peer_sends(*data)
        self.server._open(sock, sock.getpeername())  # type: ignore[arg-type]
        self.run()
        return sock

    def run(self) -> None:
        for _ in range(10_000):
            self.loop.run_once()
            if self.selector.settled:
                return
        raise AssertionError("did not settle")

    def advance(self, seconds: float) -> None:
        self.selector.until = self.clock.now + seconds
        try:
            self.run()
        finally:
            self.selector.until = None

    @property
    def counted(self) -> int:
        per_ip = self.server._per_ip
        assert per_ip is not None
        return len(per_ip)


@contextmanager
def fake_server(**settings: Any) -> Iterator[FakeServer]:
    fs = FakeServer(**settings)
    try:
        yield fs
    finally:
        fs.loop.close()


def replies(sock: FakeSocket) -> list[bytes]:
    decoder = LengthDecoder(MAX_FRAME_LIMIT, accept_errors=True)
    return decoder.feed(bytes(sock.sent))


def test_address_key() -> None:
    assert address_key(("10.0.0.1", 5)) == "10.0.0.1"
    assert address_key(("::ffff:10.0.0.1", 5, 0, 0)) == "10.0.0.1"
    assert address_key(("fe80::1%eth0", 5, 0, 2)) == "fe80::1"
    assert address_key("/run/muxsrv.sock") is None


def test_counts_are_exact() -> None:
    counts = AddressCounts(2)
    a, b = object(), object()
    counts.add(a, ("10.0.0.1", 1))  # type: ignore[arg-type]
    counts.add(a, ("10.0.0.1", 1))  # type: ignore[arg-type]  # (twice: still one)
    assert not counts.full(("10.0.0.1", 2))
    counts.add(b, ("10.0.0.1", 2))  # type: ignore[arg-type]
    assert counts.full(("10.0.0.1", 3)) and not counts.full(("10.0.0.2", 3))
    counts.forget(a)  # type: ignore[arg-type]
    counts.forget(a)  # type: ignore[arg-type]  # (twice: still one)
    assert counts.count(("10.0.0.1", 0)) == 1
    counts.forget(b)  # type: ignore[arg-type]
    assert counts._counts == {} and len(counts) == 0  # nothing kept for a gone address


def test_connection_n_plus_1_is_refused_with_an_error_frame(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bugs caught: the limit not enforced, or counted over all addresses; the refused
    client left without an error frame; a log line per refused connection."""
    with fake_server(max_conns_per_ip=2) as fs:
        first = fs.connect("10.0.0.1", frame(b"1"))
        second = fs.connect("10.0.0.1", frame(b"2"))
        other = fs.connect("10.0.0.2", frame(b"3"))
        assert replies(first) == [b"1"] and replies(second) == [b"2"] and replies(other) == [b"3"]
        for _ in range(20):
            third = fs.connect("10.0.0.1", frame(b"never"))
            assert replies(third) == [ErrorFrame(REFUSED)]
            assert third.shut_wr
        assert fs.counted == 3
    lines = [r for r in caplog.records if "too many connections from your address" in
             r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING  # the fake clock stood still
    assert lines[0].getMessage().startswith("refusing 10.0.0.1:")


@pytest.mark.parametrize("ending", ["reset", "eof", "abort", "frame timeout", "idle", "drain"])
def test_no_leak_whichever_way_a_connection_ends(ending: str) -> None:
    """Bug caught: a close path that does not give the address's slot back (after a few
    resets, or timeouts, the address is locked out for good)."""
    with fake_server(max_conns_per_ip=2, frame_timeout=1.0, idle_timeout=5.0) as fs:
        server = fs.server
        server._limits.start()
        server._schedule_idle_sweep()
        keep = fs.connect("10.0.0.1", frame(b"keep"))

        def wait(seconds: int) -> None:
            for _ in range(seconds):  # keep stays busy: never idle, never mid-message
                keep.peer_sends(frame(b"k"))
                fs.advance(1)

        for _ in range(3):  # the slot comes back every time
            sock = fs.connect("10.0.0.1", frame(b"x"))
            assert replies(sock) == [b"x"]
            assert fs.counted == 2
            if ending == "reset":
                sock.peer_resets()
            elif ending == "eof":
                sock.peer_shuts_down()
            elif ending == "abort":
                next(c for c in server._conns if c._sock is sock).abort()
            elif ending == "frame timeout":
                sock.peer_sends(b"\0\0\0\x10half")
            elif ending == "drain":
                server.shutdown()
                fs.advance(10)
                assert fs.counted == 0 and not server._conns
                return
            wait(9)  # past the timeouts and the lingering close
            assert sock.closed, ending
            assert fs.counted == 1, ending
        assert not keep.closed


def test_with_proxy_protocol_the_header_address_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bugs caught: the balancer's address counted (every client behind it refused
    together); the refusal logged once per connection."""
    with fake_server(max_conns_per_ip=2, proxying=Proxying()) as fs:
        dest = ("127.0.0.1", 9999)
        one = fs.connect("127.0.0.1", v1_header(("192.0.2.7", 1), dest) + frame(b"1"))
        two = fs.connect("127.0.0.1", v1_header(("192.0.2.7", 2), dest) + frame(b"2"))
        other = fs.connect("127.0.0.1", v1_header(("192.0.2.8", 3), dest) + frame(b"3"))
        assert [replies(s) for s in (one, two, other)] == [[b"1"], [b"2"], [b"3"]]
        for i in range(10):
            refused = fs.connect("127.0.0.1", v1_header(("192.0.2.7", 10 + i), dest)
                                 + frame(b"never"))
            assert replies(refused) == [ErrorFrame(REFUSED)]
        assert fs.counted == 3
        one.peer_shuts_down()
        fs.advance(3)
        again = fs.connect("127.0.0.1", v1_header(("192.0.2.7", 99), dest) + frame(b"again"))
        assert replies(again) == [b"again"]
        assert fs.counted == 3
    lines = [r for r in caplog.records if "too many connections from your address" in
             r.getMessage() and r.levelno >= logging.INFO]
    assert len(lines) == 1 and lines[0].getMessage().startswith("refusing 192.0.2.7:")


# -- real sockets ---------------------------------------------------------------------


def connect_from(address: tuple[str, int], source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def request(sock: socket.socket, payload: bytes) -> tuple[bool, bytes]:
    sock.sendall(frame(payload))
    return recv_frame(sock)


@pytest.mark.timeout(60)
def test_per_ip_limit_on_real_sockets() -> None:
    """Bugs caught: no refusal; another address refused too; a storm logged line by line;
    a closed connection's slot never given back."""
    with running_server("--max-conns-per-ip", "2") as srv:
        first, second = srv.connect(), srv.connect()
        with first, second:
            assert request(first, b"1") == (False, b"1")
            assert request(second, b"2") == (False, b"2")
            error = (0x80000000 | len(REFUSED)).to_bytes(4, "big") + REFUSED
            with srv.connect() as third:
                assert recv_until_eof(third) == error
            srv.wait_log(r"WARNING: refusing 127\.0\.0\.1:\d+: too many connections from your "
                         r"address \(limit 2\)")
            for _ in range(30):
                with srv.connect() as extra:
                    assert recv_until_eof(extra) == error
            assert srv.log_count("too many connections from your address") <= 2
            with connect_from(srv.address, "127.0.0.2") as elsewhere:  # another address
                assert request(elsewhere, b"other") == (False, b"other")
            first.close()

            def served() -> bool:
                with srv.connect() as s:
                    s.sendall(frame(b"again"))
                    try:
                        return recv_frame(s) == (False, b"again")
                    except ConnectionError:
                        return False

            wait_for(served, timeout=10, interval=0.05, what="the freed slot to be reused")
            assert request(second, b"still") == (False, b"still")
