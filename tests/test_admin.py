"""The admin listener on a real server: counters against generated traffic, /clients,
/healthz through the drain, the latency of a timer-driven reply, hostile admin clients."""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess, frame, plugin_env, recv_frame, running_server, wait_for

ADMIN_RE = re.compile(r"admin on ([^\s,]+):(\d+)[,)]")


def admin_address(srv: ServerProcess) -> tuple[str, int]:
    m = wait_for(lambda: ADMIN_RE.search(srv.stderr_text()), what="the admin address")
    return m.group(1), int(m.group(2))


def http(address: tuple[str, int], path: str, method: str = "GET",
         headers: str = "", timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, fields, body


def stats(address: tuple[str, int]) -> dict:  # type: ignore[type-arg]
    status, fields, body = http(address, "/stats")
    assert status == 200 and fields["content-type"] == "application/json"
    return json.loads(body)  # type: ignore[no-any-return]


def metrics(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, fields, body = http(address, "/metrics")
    assert status == 200
    assert fields["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(frame(payload))
    is_error, got = recv_frame(sock)
    assert not is_error
    return got


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with running_server("--admin-port", "0", "--max-frame", "1000", "--max-conns", "6",
                        "--idle-timeout", "0.5") as srv:
        yield srv


def test_counters_match_the_traffic_and_every_close_reason(server: ServerProcess) -> None:
    admin = admin_address(server)
    sent_bytes = 0
    with ExitStack() as stack:
        clients = [stack.enter_context(server.connect()) for _ in range(3)]
        for i in range(300):
            payload = b"m%d" % i
            assert echo(clients[i % 3], payload) == payload
            sent_bytes += 4 + len(payload)
        # eof: a clean shutdown; reset: an RST; frame_too_large: over --max-frame.
        clients[0].shutdown(socket.SHUT_WR)
        assert clients[0].recv(10) == b""
        clients[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        clients[1].close()
        clients[2].sendall(struct.pack(">I", 5000))
        assert recv_frame(clients[2])[0]  # the error frame
        # idle: one that says nothing for --idle-timeout; then --max-conns: 6 open, 1 more.
        idle = stack.enter_context(server.connect())
        assert recv_frame(idle)[0]
        clients[2].close()
        idle.close()
        wait_for(lambda: stats(admin)["connections"]["current"] == 0)
        held = [stack.enter_context(server.connect()) for _ in range(6)]
        for sock in held:
            assert echo(sock, b"x") == b"x"
        refused = stack.enter_context(server.connect())
        is_error, text = recv_frame(refused)
        assert is_error and b"too many connections" in text
        got = stats(admin)
        conns = got["connections"]
        assert conns["current"] == 6 and conns["peak"] == 6
        assert conns["accepted"] == 3 + 1 + 6
        assert conns["refused"]["max_conns"] == 1
        closed = conns["closed"]
        assert {k: v for k, v in closed.items() if v} == {
            "eof": 1, "reset": 1, "frame_too_large": 1, "idle": 1}, closed
        got = stats(admin)
        assert got["messages"] == {"in": 306, "out": 306}
        assert got["bytes"]["in"] == sent_bytes + 4 + 6 * 5  # + the oversized header
        assert got["admin"]["current"] == 1 and got["admin"]["accepted"] >= 3
        assert got["options"]["max_frame"] == 1000
        found = metrics(admin)
        assert found[("muxsrv_messages_received_total", ())] == 306
        assert found[("muxsrv_connections_closed_total", (("reason", "reset"),))] == 1
        assert found[("muxsrv_connections_refused_total", (("reason", "max_conns"),))] == 1
        assert found[("muxsrv_connections", ())] == 6
        handler = (("handler", "echo"),)
        assert found[("muxsrv_latency_seconds_count", handler)] == 306
        assert found[("muxsrv_latency_seconds_bucket", (*handler, ("le", "+Inf")))] == 306


def test_wrong_requests_are_refused(server: ServerProcess) -> None:
    admin = admin_address(server)
    assert http(admin, "/nope")[0] == 404
    status, fields, _ = http(admin, "/stats", method="POST")
    assert status == 405 and fields["allow"] == "GET"
    assert http(admin, "/healthz") == (200, http(admin, "/healthz")[1], b"ok\n")
    with socket.create_connection(admin, timeout=10) as sock:  # a head over 8 KiB
        sock.sendall(b"GET /stats HTTP/1.0\r\nX: " + b"a" * 9000)
        assert sock.recv(100).startswith(b"HTTP/1.0 431")
    started = time.monotonic()
    with socket.create_connection(admin, timeout=15) as sock:  # a head that never ends
        sock.sendall(b"GET /stats HTTP/1.0\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.0 408")
    assert 4 < time.monotonic() - started < 10


def test_timer_reply_after_5_ms_lands_in_the_5_ms_bucket() -> None:
    with running_server("--admin-port", "0", "--handler", "muxsrv_testplugins.handlers:Deferred",
                        "--deferred-delay", "0.005", env=plugin_env()) as srv:
        admin = admin_address(srv)
        with srv.connect() as sock:
            for i in range(20):
                assert echo(sock, b"%d" % i) == b"%d" % i
        latency = wait_for(lambda: [v for v in stats(admin)["latency"].values()
                                    if v["count"] == 20])[0]
        assert 5000 <= latency["p50_us"] < 10000, latency
        found = metrics(admin)
        buckets = {dict(labels)["le"]: value for (name, labels), value in found.items()
                   if name == "muxsrv_latency_seconds_bucket"}
        assert buckets["0.005"] == 0  # never sooner than the timer
        assert buckets["0.01"] >= 10  # the (5 ms, 10 ms] bucket holds the median


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_clients_with_1000_connections_and_a_slow_admin_reader() -> None:
    _raise_fd_limit(2300)
    with running_server("--admin-port", "0") as srv, ExitStack() as stack:
        admin = admin_address(srv)
        socks = [stack.enter_context(socket.create_connection(srv.address, timeout=10))
                 for _ in range(999)]
        assert echo(socks[-1], b"hello") == b"hello"
        # The non-reader: a small receive buffer, and 8 MB of echo requests it never reads.
        lazy = socket.socket()
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stack.enter_context(lazy)
        lazy.connect(srv.address)
        lazy.setblocking(False)
        lazy_port = lazy.getsockname()[1]
        stream = memoryview(frame(b"z" * 900) * 9000)  # 8 MB of whole frames
        pushed = 0
        deadline = time.monotonic() + 10
        while pushed < 4 << 20 and time.monotonic() < deadline:
            try:
                pushed += lazy.send(stream[pushed:pushed + 65536])
            except BlockingIOError:
                time.sleep(0.01)
        # (a connection the kernel queued may wait a moment for its accept)
        wait_for(lambda: stats(admin)["connections"]["current"] == 1000, timeout=15)
        # A slow admin reader: asks for /clients, then reads one byte a second.
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stack.enter_context(slow)
        slow.connect(admin)
        slow.sendall(b"GET /clients HTTP/1.0\r\n\r\n")
        assert slow.recv(1)
        # Meanwhile the data path answers at full speed ...
        started = time.monotonic()
        for i in range(300):
            assert echo(socks[i], b"ping") == b"ping"
        assert time.monotonic() - started < 3
        # ... and another admin client gets the whole list.
        status, fields, body = http(admin, "/clients", timeout=30)
        assert status == 200 and fields["content-type"] == "application/json"
        clients = json.loads(body)
        mine = [c for c in clients if c["peer"].endswith(f":{lazy_port}")]
        assert len(clients) == 1000, (mine, srv.stderr_text()[-2000:])
        assert len({c["id"] for c in clients}) == 1000
        mine = [c for c in clients if c["peer"].endswith(f":{lazy_port}")]
        assert len(mine) == 1 and mine[0]["pending_output"] > 0 and mine[0]["paused"], mine
        others = [c for c in clients if c is not mine[0]]
        assert sum(c["messages_in"] for c in others) == 301
        assert {"id", "peer", "age", "idle", "state", "handler", "bytes_in", "bytes_out",
                "messages_in", "messages_out", "pending_output", "buffered_input",
                "paused"} <= set(clients[0])
        assert stats(admin)["pending_output_bytes"] >= mine[0]["pending_output"]
        assert slow.recv(1)  # still served, a byte at a time


def test_healthz_is_503_during_the_drain_and_the_admin_port_stays_open() -> None:
    with running_server("--admin-port", "0", "--handler", "muxsrv_testplugins.handlers:Deferred",
                        "--deferred-delay", "3", "--drain-timeout", "10",
                        env=plugin_env()) as srv:
        admin = admin_address(srv)
        assert http(admin, "/healthz")[0] == 200
        with srv.connect() as sock:
            sock.sendall(frame(b"slow"))
            wait_for(lambda: "deferred got" in srv.stderr_text())
            srv.signal(signal.SIGTERM)
            wait_for(lambda: "shutting down" in srv.stderr_text())
            status, _, body = http(admin, "/healthz")
            assert (status, body) == (503, b"draining\n")
            assert stats(admin)["draining"] is True
            assert recv_frame(sock) == (False, b"slow")  # the reply owed still comes
        assert srv.wait(15) == 0


def test_exec_commands_are_counted_by_outcome(tmp_path: Path) -> None:
    from muxsrv.client import Client

    with running_server("--admin-port", "0", "--handler", "exec", "--exec-cwd", str(tmp_path),
                        "--exec-allow", "true", "--exec-allow", "false",
                        "--exec-allow", "sleep", "--exec-timeout", "0.3") as srv:
        admin = admin_address(srv)
        with Client(srv.host, srv.port, timeout=30) as c:
            assert c.exec("true").exit_code == 0
            assert c.exec("false").exit_code != 0
            assert c.exec("sleep 5").timed_out
            c.exec("rm -rf /")  # not allowed: refused, nothing runs
        got = stats(admin)["exec"]
        assert got["started"] == 3 and got["running"] == 0 and got["queued"] == 0
        assert got["finished"] == {"exit_0": 1, "nonzero": 1, "signal": 0, "timeout": 1,
                                   "truncated": 0, "refused": 1}
        assert stats(admin)["latency"]["exec"]["count"] == 4
