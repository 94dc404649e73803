"""UDP edge cases found in review: each test fails on the code before its fix."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from udp_support import A, B, C, FakeDatagramSocket, FakeLoop, endpoint

from muxsrv import Conn, Handler
from muxsrv.udp import QUEUE_ENTRY_OVERHEAD, DatagramEndpoint
from muxsrv.udp_peers import MAX_ALLOWANCE, VALIDATION_LIFETIME


def test_sweep_survives_a_connection_lost_that_closes_a_sibling(fake: FakeLoop) -> None:
    room: list[Conn] = []

    class Room(Handler):  # when one member goes, the others are closed
        def connection_made(self, conn: Conn) -> None:
            room.append(conn)

        def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
            if conn in room:
                room.remove(conn)
            for other in list(room):
                other.close()

    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, factory=Room, idle_timeout=1.0)
    sock.arrive(A, b"a")
    sock.arrive(B, b"b")
    fake.run()
    fake.advance(3)
    assert ep.peers is not None and len(ep.peers) == 0
    room.clear()
    sock.arrive(C, b"c")
    fake.run()
    fake.advance(3)
    assert C not in ep.peers  # the sweep still runs


def test_empty_replies_are_bounded_in_the_queue(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, function=lambda p: p, max_queue=10 * QUEUE_ENTRY_OVERHEAD)
    sock.capacity = -1  # EAGAIN even for an empty reply
    sock.arrive(A, *[b""] * 50)
    fake.run()
    assert ep.queued == 10 * QUEUE_ENTRY_OVERHEAD
    assert ep.counts["queue full (--udp-max-queue)"] == 40


def test_max_queue_zero_drops_at_once(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, function=lambda p: p, max_queue=0)
    sock.capacity = -1
    sock.arrive(A, b"", b"", b"x")
    fake.run()
    assert ep.queued == 0 and ep.counts["queue full (--udp-max-queue)"] == 3


def test_allowance_adds_up_for_deferred_replies_but_is_capped(fake: FakeLoop) -> None:
    class Later(Handler):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            if payload.startswith(b"burst "):
                for _ in range(int(payload[6:])):
                    conn.send(b"y" * 60_000)
                return
            conn.work_started()

            def answer() -> None:
                conn.send(payload * 3)
                conn.work_done()

            conn.loop.call_later(0.1, answer)

    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, factory=Later)
    sock.arrive(A, b"0123456789", b"abcdefghij")  # two in flight, each answered with 3x
    fake.run()
    fake.advance(1)
    assert [r[:4] for r in sock.replies_to(A)] == [b"0123", b"abcd"]
    assert "amplification" not in ep.dropped()
    # Many large datagrams answered with nothing: the allowance stops at MAX_ALLOWANCE.
    sock.arrive(B, *[b"z" * 60_000] * 10)
    fake.run()
    sock.arrive(B, b"burst 4")
    fake.run()
    assert MAX_ALLOWANCE // 60_000 == 3
    assert len(sock.replies_to(B)) == 3 and ep.dropped()["amplification"] == 1


@pytest.mark.parametrize(("source", "reason"), [
    (("127.0.0.1", 0), "source port 0"),
    (("127.0.0.1", 7), "source port < 1024"),
    (("127.0.0.1", 1023), "source port < 1024"),
    (("127.0.0.1", 9999), "source is this endpoint"),  # the fake socket's own address
])
def test_reply_loop_sources_are_dropped(fake: FakeLoop, source: Any, reason: str) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, function=lambda p: p)
    sock.arrive(source, b"ping")
    sock.arrive(A, b"ping")
    fake.run()
    assert sock.sent_to == [(b"ping", A)]
    assert ep.counts == {reason: 1}


def test_low_ports_answered_when_allowed_but_not_port_0(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, function=lambda p: p, allow_low_ports=True)
    sock.arrive(("127.0.0.1", 7), b"a")
    sock.arrive(("127.0.0.1", 0), b"b")
    fake.run()
    assert sock.sent_to == [(b"a", ("127.0.0.1", 7))]
    assert ep.counts == {"source port 0": 1}


def test_wildcard_bind_drops_its_own_port_from_any_host(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket(("0.0.0.0", 5000))
    ep = endpoint(fake, sock, function=lambda p: p)
    sock.arrive(("127.0.0.2", 5000), b"a")
    sock.arrive(("127.0.0.2", 5001), b"b")
    fake.run()
    assert sock.sent_to == [(b"b", ("127.0.0.2", 5001))]
    assert ep.counts == {"source is this endpoint": 1}


def test_validation_lasts_a_fixed_time_not_refreshed_by_datagrams(fake: FakeLoop) -> None:
    class Big(Handler):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            if payload == b"validate":
                conn.peer_validated()
            else:
                conn.send(b"x" * 5000)

    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, factory=Big, idle_timeout=10 * VALIDATION_LIFETIME)
    sock.arrive(A, b"validate", b"big")
    fake.run()
    assert len(sock.replies_to(A)) == 1
    for _ in range(4):  # datagrams all along: the validation still ends on time
        fake.advance(VALIDATION_LIFETIME / 4 - 1)
        sock.arrive(A, b"big")
        fake.run()
    assert len(sock.replies_to(A)) == 5 and "amplification" not in ep.dropped()
    fake.advance(5)
    sock.arrive(A, b"big")
    fake.run()
    assert len(sock.replies_to(A)) == 5 and ep.dropped()["amplification"] == 1
    sock.arrive(A, b"validate", b"big")  # a new proof: a new lifetime
    fake.run()
    assert len(sock.replies_to(A)) == 6


class Trace(Handler):
    """Records every call in a shared list; ``close`` closes the instance."""

    trace: list[tuple[str, Any]]  # each test makes a subclass with its own

    def connection_made(self, conn: Conn) -> None:
        self.trace.append(("made", conn.peer))

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self.trace.append(("got", payload))
        if payload == b"close":
            conn.close()

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        self.trace.append(("lost", conn.peer))


def test_old_instance_is_told_lost_before_the_new_one_is_made(fake: FakeLoop) -> None:
    cls = type("T", (Trace,), {"trace": []})
    sock = FakeDatagramSocket()
    endpoint(fake, sock, factory=cls)
    sock.arrive(A, b"close", b"next")  # one batch: connection_lost not yet run from the loop
    fake.run()
    assert cls.trace == [("made", A), ("got", b"close"), ("lost", A), ("made", A),
                         ("got", b"next")]


def test_closed_instances_are_told_lost_when_the_endpoint_closes(fake: FakeLoop) -> None:
    cls = type("T", (Trace,), {"trace": []})
    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, factory=cls)
    sock.arrive(A, b"x")
    fake.run()
    assert ep.peers is not None
    ep.peers.datagram(B, b"close", ep._channels[0], fake.loop.now)  # as a read would
    assert ("lost", B) not in cls.trace  # B's connection_lost is queued on the loop
    ep.close()
    assert cls.trace.count(("lost", A)) == 1 and cls.trace.count(("lost", B)) == 1
    fake.run()
    assert cls.trace.count(("lost", B)) == 1  # once only


def test_eviction_spares_validated_peers(fake: FakeLoop) -> None:
    class Big(Handler):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            if payload == b"validate":
                conn.peer_validated()
            conn.send(b"x" * 5000)

    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, factory=Big, max_peers=3)
    sock.arrive(A, b"validate")  # A: validated, and the least recently active
    sock.arrive(B, b"b")
    fake.run()
    for port in range(50000, 50010):  # a flood from new (forgeable) addresses
        sock.arrive(("127.0.0.1", port), b"f")
    fake.run()
    assert ep.peers is not None and A in ep.peers and len(ep.peers) == 3
    assert B not in ep.peers and ep.dropped()["peer table full"] == 9  # the first fits
    sock.arrive(A, b"big")
    fake.run()
    assert len(sock.replies_to(A)) == 2  # still validated: the large reply goes


def test_failing_connection_lost_is_logged_rate_limited(
        fake: FakeLoop, caplog: pytest.LogCaptureFixture) -> None:
    class Bad(Handler):
        def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
            raise RuntimeError("cleanup bug")

    sock = FakeDatagramSocket()
    ep = endpoint(fake, sock, factory=Bad, max_peers=1)
    with caplog.at_level(logging.INFO, "muxsrv"):
        for i in range(200):  # 200 (forgeable) sources: each evicts the one before
            sock.arrive((f"10.0.0.{i + 1}", 5000), b"x")
        fake.run()
    failed = [r for r in caplog.records if "connection_lost failed" in r.getMessage()]
    assert 1 <= len(failed) <= 3
    assert ep.dropped()["handler error"] == 199


def test_protected_mode_knows_ipv4_mapped_loopback(fake: FakeLoop) -> None:
    sock = FakeDatagramSocket(("::", 9999, 0, 0))
    ep = endpoint(fake, sock, function=lambda p: p, loopback_only=True)
    sock.arrive(("::ffff:127.0.0.1", 40001, 0, 0), b"a")
    sock.arrive(("::ffff:10.0.0.1", 40001, 0, 0), b"b")
    sock.arrive(("::1", 40001, 0, 0), b"c")
    fake.run()
    assert [data for data, _ in sock.sent_to] == [b"a", b"c"]
    assert ep.counts == {"not loopback (protected mode)": 1}


def test_port_0_with_udp_retries_the_pair_when_the_udp_port_is_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from muxsrv.loop import EventLoop
    from muxsrv.server import CannotListen, Server, Settings

    real = DatagramEndpoint.listen
    tries: list[int] = []

    def taken(times: int) -> Any:
        def listen(self: DatagramEndpoint, host: str, port: int, socks: Any = None) -> Any:
            tries.append(port)
            if len(tries) <= times:
                raise OSError(errno.EADDRINUSE, "Address already in use")
            return real(self, host, port, socks)
        return listen

    def server() -> Server:
        return Server(loop, Settings(host="127.0.0.1", port=0, udp="also"),
                      function=lambda p: p)

    loop = EventLoop()
    try:
        monkeypatch.setattr(DatagramEndpoint, "listen", taken(2))
        ok = server()
        [address] = ok.listen()
        assert len(tries) == 3 and address[1] == tries[-1]
        assert ok.udp is not None and ok.udp.addresses == [address]
        ok.shutdown()
        tries.clear()
        monkeypatch.setattr(DatagramEndpoint, "listen", taken(1000))
        with pytest.raises(CannotListen):
            server().listen()
        assert len(tries) == 5  # a few tries, then the error
    finally:
        loop.close()
