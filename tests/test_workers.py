"""--workers: several processes share one port; a dead worker is replaced.

Catches: SO_REUSEPORT not set (the second worker fails to bind), a parent
that does not restart workers, a restart that disturbs the other workers'
connections, and a parent that does not forward SIGTERM or exits non-zero.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, wait_for

from muxsrv.client import Client

WORKER_RE = re.compile(r"listening on \S+ \(.*worker pid (\d+)\)")

PID_HANDLER = """
import os

def pid(payload: bytes) -> bytes:
    return str(os.getpid()).encode()
"""


def worker_pids(srv: ServerProcess) -> list[int]:
    return [int(m.group(1)) for line in srv.lines if (m := WORKER_RE.search(line))]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
def test_workers_share_the_port_and_restart(tmp_path: Path) -> None:
    (tmp_path / "pidhandler.py").write_text(PID_HANDLER)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    srv = ServerProcess(["--port", "0", "--workers", "2", "--handler", "pidhandler:pid"], env=env)
    try:
        srv.wait_started()
        wait_for(lambda: len(worker_pids(srv)) == 2, what="two workers listening")
        first = set(worker_pids(srv))

        served_by: set[int] = set()
        for _ in range(64):
            with Client(srv.host, srv.port) as c:
                served_by.add(int(c.request(b"?")))
            if len(served_by) == 2:
                break
        assert served_by == first, "connections should be spread over both workers"

        # Keep one connection open on each worker, then kill one worker.
        clients = {}
        for _ in range(64):
            c = Client(srv.host, srv.port)
            pid = int(c.request(b"?"))
            if pid in clients:
                c.close()
            else:
                clients[pid] = c
            if len(clients) == 2:
                break
        victim, survivor = sorted(clients)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(srv)) == 3, what="a replacement worker")
        replacement = (set(worker_pids(srv)) - first).pop()
        assert alive(replacement)
        # The surviving worker's connection is untouched.
        assert int(clients[survivor].request(b"?")) == survivor
        for c in clients.values():
            c.close()

        assert srv.stop() == 0
        wait_for(lambda: not alive(survivor) and not alive(replacement), what="workers gone")
    finally:
        srv.kill()


def test_workers_option_is_checked() -> None:
    srv = ServerProcess(["--port", "0", "--workers", "-1"])
    assert srv.wait() == 2
    assert "--workers" in srv.stderr_text()
