"""--workers 2 with --admin-port: one admin port, every worker's numbers, a dead one's kept."""

from __future__ import annotations

import os
import re
import signal
import socket

from support import wait_for
from test_admin import echo, http, metrics, stats
from test_workers import supervisor, worker_pids

ADMIN_RE = re.compile(r"admin port on (\S+):(\d+),")


def test_workers_2_one_admin_port_sums_and_keeps_a_dead_workers_counters() -> None:
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
            status, _, body = http(admin, "/clients")
            assert status == 200 and b'"worker"' in body
        finally:
            for sock in socks:
                sock.close()
        # A worker killed: its replacement starts from 0, its counts stay in the sums.
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
