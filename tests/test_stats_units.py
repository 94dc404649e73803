"""The pieces of the admin listener alone: histogram, request-head reader, Prometheus text,
and the counters of one connection driven over a fake socket."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from muxsrv.httphead import MAX_HEAD, BadRequest, HeadReader, Request
from muxsrv.loop import EventLoop
from muxsrv.promtext import render
from muxsrv.stats import MAX_US, Histogram, Stats, bucket_of, bucket_range, merge_snapshots
from muxsrv.testing import Harness
from muxsrv.transport import Transport, _kernel_bytes


def test_buckets_tile_the_range_within_one_percent() -> None:
    prev_hi = 0
    for index in range(bucket_of(MAX_US) + 1):
        lo, hi = bucket_range(index)
        assert lo == prev_hi and hi > lo
        assert (hi - lo) / lo <= 0.01 if lo >= 256 else hi - lo == 1
        assert bucket_of(lo) == index and bucket_of(hi - 1) == index
        prev_hi = hi


def test_percentiles_match_sorted_values_to_two_digits() -> None:
    rng = random.Random(12)
    values = [rng.expovariate(1 / 0.002) for _ in range(20000)]
    hist = Histogram()
    for i, v in enumerate(values):
        if i % 2:
            hist.add(v)
        else:
            hist.add_us(int(v * 1e6))  # as connections record it
    values.sort()
    for pct in (50, 90, 99, 99.9):
        exact = values[int(len(values) * pct / 100) - 1] * 1e6
        assert abs(hist.percentile(pct) - exact) <= exact * 0.011 + 1, pct
    assert hist.count == 20000
    assert abs(hist.max_us - values[-1] * 1e6) <= values[-1] * 1e4 + 1


def test_counts_and_extremes() -> None:
    hist = Histogram()
    hist.add(0.005, 7)
    hist.add(-1.0)  # a clock that went back: counted as 0
    hist.add(1e6)  # past 100 s: counted at the top
    assert hist.count == 9
    assert hist.max_us == MAX_US
    assert hist.percentile(50) == pytest.approx(5000, rel=0.01)
    coarse = dict(hist.coarse())
    assert coarse[0.002] == 1 and coarse[0.005] == 1 and coarse[0.01] == 8


def test_head_reader_whole_and_byte_by_byte() -> None:
    head = b"GET /stats?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t0k\r\n\r\n"
    whole = HeadReader().feed(head)
    reader = HeadReader()
    results = [reader.feed(head[i:i + 1]) for i in range(len(head))]
    assert all(r is None for r in results[:-1])
    for got in (whole, results[-1]):
        assert isinstance(got, Request)
        assert (got.method, got.path, got.query) == ("GET", "/stats", "x=1")
        assert got.headers["authorization"] == "Bearer t0k"


@pytest.mark.parametrize(("data", "status"), [
    (b"GET /x HTTP/1.0\r\n" + b"X-A: " + b"a" * MAX_HEAD, 431),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /x SPDY/3\r\n\r\n", 505),
    (b"GET /x HTTP/1.0\r\nno colon\r\n\r\n", 400),
])
def test_head_reader_refusals(data: bytes, status: int) -> None:
    got = HeadReader().feed(data)
    assert isinstance(got, BadRequest) and got.status == status


def test_metrics_text_parses_and_says_what_the_stats_say() -> None:
    stats = Stats("echo", {"framing": "length", "port": 9999}, "1.2.3")
    stats.accepted = 5
    stats.refuse("max_conns")
    stats.retire("idle", (100, 90, 10, 9))
    stats.latency.add(0.0042, 3)
    text = render(stats.snapshot([]), {"echo": stats.latency})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    def value(name: str, **labels: str) -> float:
        for sample in families[name].samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()) and (
                    sample.name == name or sample.name == name + "_total"):
                return float(sample.value)
        raise KeyError((name, labels))
    assert value("muxsrv_connections_accepted") == 5
    assert value("muxsrv_connections_refused", reason="max_conns") == 1
    assert value("muxsrv_connections_closed", reason="idle") == 1
    assert value("muxsrv_received_bytes") == 100
    assert value("muxsrv_messages_sent") == 9
    assert families["muxsrv_latency_seconds"].type == "histogram"
    buckets = {s.labels["le"]: s.value for s in families["muxsrv_latency_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["0.002"] == 0 and buckets["0.005"] == 3 and buckets["+Inf"] == 3
    info = families["muxsrv_info"].samples[0].labels
    assert info["version"] == "1.2.3" and info["framing"] == "length"


def test_merge_keeps_a_dead_workers_counters_but_not_its_gauges() -> None:
    snaps = []
    for worker, alive in ((0, True), (1, False)):
        stats = Stats("echo", {}, "1")
        stats.accepted = 10 + worker
        stats.latency.add(0.001 * (worker + 1), 5)
        snap = stats.snapshot([], fine=True)
        snap["connections"]["current"] = 3
        snap.update(worker=worker, pid=100 + worker, alive=alive)
        snaps.append(snap)
    merged = merge_snapshots(snaps)
    assert merged["connections"]["accepted"] == 21
    assert merged["connections"]["current"] == 3  # the dead worker's 3 are gone
    assert merged["latency"]["echo"]["count"] == 10
    assert [w["worker"] for w in merged["workers"]] == [0, 1]


def test_connection_counts_bytes_messages_and_latency() -> None:
    with Harness(function=lambda p: p if p != b"quiet" else None) as h:
        frames = [b"\x00\x00\x00\x02hi", b"\x00\x00\x00\x05quiet", b"\x00\x00\x00\x03abc"]
        h.peer_sends(b"".join(frames[:2]))
        h.run()
        h.peer_sends(frames[2])
        h.run()
        assert h.replies() == [b"hi", b"abc"]
        b_in, b_out, m_in, m_out = h.conn.counts()
        assert (b_in, b_out, m_in, m_out) == (sum(map(len, frames)), 13, 3, 2)
        assert h.latency.count == 2  # the fake clock stood still: both at 0 µs
        assert h.latency.percentile(100) == 0


def _wait(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)  # (polling a condition with a deadline)


def test_kernel_byte_counts_over_tcp_exclude_unread_input_and_each_fin() -> None:
    """The TCP path's counts (no per-read work): read and taken, exact, FINs not counted."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            client.sendall(b"x" * 1000)
            got = b""
            while len(got) < 600:
                got += server.recv(600 - len(got))
            _wait(lambda: _kernel_bytes(server, 0, 0, False, False)[0] == 600)
            server.sendall(b"y" * 300)
            assert _kernel_bytes(server, 0, 0, False, False) == (600, 300)  # 400 unread
            client.shutdown(socket.SHUT_WR)
            _wait(lambda: _kernel_bytes(server, 0, 0, False, False)[0] == 600)  # FIN unread
            while server.recv(4096):
                pass
            server.shutdown(socket.SHUT_WR)
            _wait(lambda: client.recv(4096) == b"")  # (the 300 bytes, then EOF)
            assert _kernel_bytes(server, 0, 0, True, True) == (1000, 300)
    assert _kernel_bytes(server, 7, 8, False, False) == (7, 8)  # closed: what it was given


def test_a_reply_sent_in_its_turn_is_timed_by_the_turns_end_once() -> None:
    """The function form's fast path: no clock read per batch; the turn's end times it."""
    holder: list[Harness] = []

    def slow(payload: bytes) -> bytes:
        holder[0].clock.advance(0.005)  # the handler "takes" 5 ms of the turn
        return payload

    with Harness(function=slow) as h:
        holder.append(h)
        h.peer_sends(b"\x00\x00\x00\x02hi\x00\x00\x00\x02ho")
        h.run()
        assert h.replies() == [b"hi", b"ho"]
        assert h.latency.turn == 0  # settled at the turn's end
        assert h.latency.count == 2
        # Both timed by the whole turn (10 ms: two 5 ms calls), the bucket's 1%.
        assert 10_000 <= h.latency.percentile(50) <= 10_100


def test_kernel_counts_are_asked_again_only_after_an_event() -> None:
    """A scrape asks the kernel of busy connections only; idle ones give what it said."""
    loop = EventLoop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        t = Transport(loop, server, None)
        try:
            client.sendall(b"x" * 10)
            assert server.recv(10) == b"x" * 10
            loop.now = t.last_active + 1  # a later turn than the read's event
            assert t.byte_counts() == (10, 0)
            client.sendall(b"y" * 5)
            assert server.recv(5) == b"y" * 5  # (no event marked it: as if still idle)
            loop.now += 1
            assert t.byte_counts() == (10, 0)  # not asked again
            t.last_active = loop.now  # an event in this turn: asked again
            assert t.byte_counts() == (15, 0)
            assert t.byte_counts() == (15, 0)  # (and again in the same turn: it may move)
        finally:
            client.close()
            server.close()
            loop.close()
