"""--workers 2 with --admin-port: one admin port, every worker's numbers, a dead one's kept."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from support import wait_for
from test_admin import echo, http, metrics, stats
from test_client_stat import spawn
from test_workers import supervisor, worker_pids

from muxsrv.admin import AdminServer
from muxsrv.loop import EventLoop
from muxsrv.workerstats import PUBLISH_EVERY, RELAY_MAX_ITEMS, Relay

ADMIN_RE = re.compile(r"admin port on (\S+):(\d+),")


def _stats_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("muxsrv-stats-*")}


def test_workers_2_one_admin_port_sums_and_keeps_a_dead_workers_counters() -> None:
    dirs_before = _stats_dirs()
    with supervisor("--workers", "2", "--admin-port", "0") as srv:
        srv.wait_started()
        wait_for(lambda: len(worker_pids(srv)) == 2, what="two workers")
        m = wait_for(lambda: ADMIN_RE.search(srv.stderr_text()), what="the admin line")
        admin = (m.group(1), int(m.group(2)))
        # Connections go to whichever worker accepts: keep opening until both have some.
        socks: list[socket.socket] = []
        sent = 0
        try:
            for _ in range(40):
                sock = socket.create_connection(srv.address, timeout=10)
                socks.append(sock)
                for i in range(5):
                    assert echo(sock, b"%d" % i) == b"%d" % i
                    sent += 1
            # (each worker's numbers reach the others within a second)
            def both_counted() -> dict | None:  # type: ignore[type-arg]
                got = stats(admin)
                done = (got["messages"]["in"] == sent and len(got["workers"]) == 2
                        and got["connections"]["current"] == 40)
                return got if done else None
            got = wait_for(both_counted, timeout=10, what="every message in the sums")
            assert sum(w["connections"]["current"] for w in got["workers"]) == 40
            assert {w["pid"] for w in got["workers"]} == set(worker_pids(srv))
            assert all(w["alive"] for w in got["workers"])
            assert got["latency"]["echo"]["count"] == sent
            def per_worker() -> dict[str, float] | None:
                found = metrics(admin)
                counts = {dict(labels)["worker"]: value for (name, labels), value in found.items()
                          if name == "muxsrv_messages_received_total"}
                return counts if sum(counts.values()) == sent else None
            assert set(wait_for(per_worker, timeout=10)) == {"0", "1"}
            for _ in range(4):  # whichever worker answers: every worker's connections
                status, _, body = http(admin, "/clients")
                assert status == 200
                clients = json.loads(body)
                assert len(clients) == 40
                assert len({c["id"] for c in clients if c["worker"] == 0}) == sum(
                    c["worker"] == 0 for c in clients)
                assert {c["worker"] for c in clients} == {
                    w["worker"] for w in got["workers"] if w["connections"]["current"]}
            # muxsrv-client --stat against it for a few lines, while a client keeps sending.
            proc = spawn("--admin", f"{admin[0]}:{admin[1]}", "--interval", "0.3")
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(
                line.rstrip("\n") for line in proc.stdout or ()), daemon=True)
            reader.start()
            try:
                deadline = time.monotonic() + 15
                while len(lines) < 5 and time.monotonic() < deadline:
                    assert echo(socks[0], b"more") == b"more"
                    sent += 1
                proc.send_signal(signal.SIGINT)
                assert proc.wait(10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            reader.join(5)
            assert lines[0].startswith(f"muxsrv at {admin[0]}:{admin[1]}, 2 workers"), lines
            # The connections column counts both workers' (a line may come from numbers
            # a worker wrote before its connections came: up to PUBLISH_EVERY old).
            columns = [line.split()[0] for line in lines[2:] if line.split()]
            assert "40" in columns, lines
            got = wait_for(both_counted, timeout=10, what="the later messages too")
        finally:
            for sock in socks:
                sock.close()
        # A worker killed: its replacement starts from 0, its counts stay in the sums (all of
        # them once it has written its file after the last message: within PUBLISH_EVERY).
        last_message = time.monotonic()
        wait_for(lambda: time.monotonic() > last_message + PUBLISH_EVERY + 0.3, timeout=5)
        def settled() -> dict | None:  # type: ignore[type-arg]
            got = stats(admin)
            return got if (got["messages"]["in"] == sent
                           and got["connections"]["current"] == 0) else None
        got = wait_for(settled, timeout=10, what="the sums once more")
        victim = max(got["workers"], key=lambda w: w["messages"]["in"])["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(srv)) == 3, timeout=15, what="a replacement")
        def dead_listed() -> bool:
            workers = stats(admin)["workers"]
            return any(w["pid"] == victim and not w["alive"] for w in workers) and len(
                workers) == 3
        wait_for(dead_listed, timeout=10, what="the dead worker listed")
        # Its counters stay (as of its last write), its gauges count 0.
        wait_for(lambda: stats(admin)["connections"]["current"] == 0, timeout=10)
        after = stats(admin)
        assert after["messages"]["in"] == sent  # the victim's share is still in the sums
        dead = [w for w in after["workers"] if w["pid"] == victim]
        before = [w for w in got["workers"] if w["pid"] == victim]
        assert dead[0]["messages"]["in"] == before[0]["messages"]["in"] > 0
        assert http(admin, "/healthz")[0] == 200
        assert _stats_dirs() - dirs_before  # (made by the supervisor) ...
        srv.signal(signal.SIGTERM)
        assert srv.wait(20) == 0
    assert _stats_dirs() <= dirs_before  # ... and removed as it exits


def test_a_relay_reads_another_workers_list_in_order_and_bounded(tmp_path: Path) -> None:
    """Bugs caught: items lost or reordered across reads, a relay that reads ahead without
    bound while nobody writes its items, a socket left registered once it is done."""
    loop = EventLoop()

    class Listing:
        draining = False

        def clients(self) -> Iterator[dict[str, int]]:
            for i in range(3000):
                yield {"id": i, "pad": "x" * 200}

    peer = AdminServer(loop, Listing(), SimpleNamespace(  # type: ignore[arg-type]
        admin_accepted=0, admin_current=0, admin_refused=0))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "0-1.sock"))
    sock.listen(4)
    peer.listen("", 0, sock=sock)
    try:
        relay = Relay(loop, tmp_path / "0-1.sock")
        most = 0
        loop.run_until(lambda: len(relay.items) >= RELAY_MAX_ITEMS or relay.done, 10)
        assert not relay.done and not relay.reading  # stopped reading ahead
        for _ in range(5):
            loop.run_once(max_wait=0.01)
        assert len(relay.items) < RELAY_MAX_ITEMS + 400
        got: list[int] = []

        def taken() -> bool:
            nonlocal most
            most = max(most, len(relay.items))
            while relay.items:
                got.append(relay.items.popleft()["id"])
                relay.more()
            return relay.done and not relay.items

        assert loop.run_until(taken, 10)
        assert got == list(range(3000))
        assert most < RELAY_MAX_ITEMS + 400
        assert not relay.reading and relay.sock.fileno() == -1  # unregistered, closed
    finally:
        peer.close()
        loop.close()
