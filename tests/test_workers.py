"""--workers: several processes share one port, under a parent that neither hangs, spins nor shares.

Catches: connections not spread over the workers; a parent that does not
restart workers, or restarts a crash loop without a back-off or with a log
line per crash; a second muxsrv sharing a served port; a supervisor that
cannot listen starting workers anyway; a signal during the spawns leaving the
parent waiting forever; workers outliving a SIGKILLed parent; a second signal
not escalating; a Ctrl-C to the process group aborting the drain.  (Reloads:
tests/test_reload.py.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, frame, recv_frame, wait_for

from muxsrv.client import Client
from muxsrv.generations import FIRST_BACKOFF, HEALTHY_AFTER, MAX_BACKOFF, Backoff
from muxsrv.server import CannotListen, Settings, _bind
from muxsrv.supervisor import open_listeners

pytestmark = pytest.mark.timeout(60)

WORKER_RE = re.compile(r"listening on \S+ \(.*worker pid (\d+)\)")
TOKEN = "MUXSRV_TEST_TOKEN"

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


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def tagged(token: str) -> list[int]:
    """Live processes whose environment carries ``token``: ours, even once orphaned."""
    needle = f"{TOKEN}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
    return found


class Supervisor(ServerProcess):
    """``muxsrv --port 0 ARGS`` with a token in its environment, so that its workers can be
    found even once orphaned."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.token = uuid.uuid4().hex
        env = {**(env or {}), TOKEN: self.token}
        super().__init__(["--port", "0", *args], env=env, preexec_fn=preexec_fn)

    def all_gone(self, timeout: float = 10.0) -> None:
        wait_for(lambda: not tagged(self.token), timeout, what="no worker left")


@contextlib.contextmanager
def supervisor(
    *args: str, env: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None
) -> Iterator[Supervisor]:
    """A Supervisor; it and every process with its token are killed at the end."""
    srv = Supervisor(*args, env=env, preexec_fn=preexec_fn)
    try:
        yield srv
    finally:
        srv.kill()
        for pid in tagged(srv.token):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_workers_share_the_port_and_restart(tmp_path: Path) -> None:
    (tmp_path / "pidhandler.py").write_text(PID_HANDLER)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    with supervisor("--workers", "2", "--handler", "pidhandler:pid", env=env) as srv:
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
        srv.all_gone()


def test_workers_option_is_checked() -> None:
    srv = ServerProcess(["--port", "0", "--workers", "-1"])
    assert srv.wait() == 2
    assert "--workers" in srv.stderr_text()


# -- a served port is refused ------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")])
def test_a_served_port_is_refused(first: str, second: str) -> None:
    """Bug caught: an `upper` muxsrv --workers on an `echo` muxsrv's port answering part of
    its clients (SO_REUSEPORT shares with any socket of the same user)."""
    with supervisor("--workers", first) as srv:
        srv.wait_started()
        run = subprocess.run(
            [sys.executable, "-m", "muxsrv", "--port", str(srv.port), "--handler", "upper",
             "--workers", second],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), TOKEN: srv.token},
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
        assert (run.returncode, run.stderr) == (
            2, f"muxsrv: error: cannot listen on 127.0.0.1:{srv.port}: Address already in use\n"
        )
        for _ in range(8):  # every connection still reaches the echo server
            with Client(srv.host, srv.port) as c:
                assert c.request(b"x") == b"x"
        assert srv.stop() == 0


def test_the_supervisors_listeners_hold_the_port_for_it_alone() -> None:
    """Bug caught: listeners that let another instance (single-process, a supervisor, or
    anything with SO_REUSEPORT) bind the port and take part of its connections."""
    held = open_listeners(Settings(port=0))
    port = held[0].getsockname()[1]
    try:
        with pytest.raises(CannotListen) as info:
            open_listeners(Settings(port=port))
        assert info.value.errno == errno.EADDRINUSE
        for reuse_port in (False, True):
            with pytest.raises(OSError) as single:
                _bind(Settings(port=port, reuse_port=reuse_port))
            assert single.value.errno == errno.EADDRINUSE
    finally:
        for sock in held:
            sock.close()
    for sock in open_listeners(Settings(port=port)):
        sock.close()


def test_the_reservation_tolerates_time_wait() -> None:
    """Bug caught: a reservation without SO_REUSEADDR failing for a minute after a
    single-process server on that port closed connections."""
    with socket.socket() as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        port = lsock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = lsock.accept()
            conn.close()  # the server side closes first: its end is left in TIME_WAIT
            assert client.recv(1) == b""
    for sock in open_listeners(Settings(port=port)):
        sock.close()


# -- a supervisor that cannot listen -------------------------------------------------

REFUSING_SUPERVISOR = """
import errno, sys
from muxsrv import cli, server

def refuse(settings):
    raise PermissionError(errno.EACCES, "Permission denied")

server._bind = refuse  # the supervisor's listen fails
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_supervisor_that_cannot_listen_stops_with_one_line_and_no_worker() -> None:
    """Bug caught: workers started (and restarted forever) without the listening sockets,
    or more than one line.  (Before the supervisor owned the sockets, each worker bound
    its own and this was a worker's failure.)"""
    token = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(ROOT), TOKEN: token}
    try:
        run = subprocess.run(
            [sys.executable, "-c", REFUSING_SUPERVISOR, "--port", "0", "--workers", "3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=20,
            stdin=subprocess.DEVNULL,
        )
        assert run.returncode == 1
        assert run.stderr == "muxsrv: error: cannot listen on 127.0.0.1:0: Permission denied\n"
        assert not tagged(token)
    finally:
        for pid in tagged(token):
            os.kill(pid, signal.SIGKILL)


# -- crash loops -----------------------------------------------------------------------


def test_a_crash_loop_backs_off_and_is_logged_once() -> None:
    """Bug caught: a crash loop restarted at full speed, or one log line per crash."""
    with supervisor("--workers", "2") as srv:
        srv.wait_started()
        wait_for(lambda: len(worker_pids(srv)) == 2, what="two workers listening")
        gaps = []
        for n in range(5):
            victim = worker_pids(srv)[-1]
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda n=n: len(worker_pids(srv)) == 3 + n, interval=0.002,
                     what="a replacement")
            gaps.append(time.monotonic() - killed)
        for n, gap in enumerate(gaps):
            expected = min(FIRST_BACKOFF * 2**n, MAX_BACKOFF)
            assert gap >= expected * 0.9, f"replacement {n} after {gap:.3f}s: {gaps}"
        assert srv.log_count(r"worker \d+ (exited|was killed)") == 1, srv.stderr_text()
        assert srv.log_count(r"back-off \(0\.1 s doubling to 5 s\)") == 1
        assert srv.stop() == 0
        srv.all_gone()


def test_backoff_doubles_caps_and_resets() -> None:
    """Bug caught: no cap, no reset, or a crash loop announced more than once."""
    b = Backoff()
    now = 100.0
    delays = []
    for _ in range(8):
        delay, starts = b.died(now, lived=0.5)
        delays.append((delay, starts))
        now += delay + 0.5
    assert delays[:3] == [(0.1, True), (0.2, False), (0.4, False)]
    assert [d for d, _ in delays][-2:] == [MAX_BACKOFF, MAX_BACKOFF]
    assert b.died(now, lived=HEALTHY_AFTER) == (0.0, False)  # one lived: loop over
    assert b.died(now + 1, lived=0.5) == (0.1, True)  # a new loop, announced
    # No young death for HEALTHY_AFTER after the last replacement: over as well.
    assert b.died(now + 1.2 + HEALTHY_AFTER, lived=0.5) == (0.1, True)


# -- signals -------------------------------------------------------------------


def test_sigterm_during_the_forks_stops_every_worker() -> None:
    """Bug caught: a SIGTERM while workers are being forked (between fork() and recording
    the PID, or before the rest are started) leaving the parent waiting forever."""
    for _ in range(3):
        with supervisor("--workers", "12", "--drain-timeout", "2") as srv:
            wait_for(lambda: children(srv.pid), timeout=15, interval=0.001, what="a fork")
            srv.signal(signal.SIGTERM)
            started = time.monotonic()
            assert srv.wait(timeout=10) == 0, srv.stderr_text()
            assert time.monotonic() - started < 2 + 2  # the drain timeout, and some slack
            srv.all_gone()


def test_workers_exit_when_the_parent_is_killed() -> None:
    """Bug caught: workers left serving (and holding the port) after a SIGKILLed parent."""
    with supervisor("--workers", "2") as srv:
        srv.wait_started()
        pids = wait_for(lambda: len(worker_pids(srv)) == 2 and worker_pids(srv))
        os.kill(srv.pid, signal.SIGKILL)
        srv.wait()
        wait_for(lambda: not any(alive(pid) for pid in pids), what="workers gone")
        srv.all_gone()


def drain_with_a_busy_connection(srv: Supervisor) -> socket.socket:
    """A connection owing a reply (half a frame sent): the drain waits for it."""
    sock = srv.connect()
    sock.sendall(frame(b"first"))
    assert recv_frame(sock) == (False, b"first")
    sock.sendall(frame(b"second")[:6])
    return sock


def test_a_second_signal_kills_the_workers_and_exits_1() -> None:
    """Bug caught: a second SIGTERM only forwarded (the parent exits 0 after the workers
    aborted) or ignored (the parent waits out the drain)."""
    with supervisor("--workers", "2", "--drain-timeout", "30") as srv:
        srv.wait_started()
        wait_for(lambda: len(worker_pids(srv)) == 2, what="two workers listening")
        with drain_with_a_busy_connection(srv):
            srv.signal(signal.SIGTERM)
            srv.wait_log(r"draining 1 connections")
            srv.signal(signal.SIGTERM)
            assert srv.wait(timeout=10) == 1
        assert srv.log_count(r"second signal: killing the [12] workers still running") == 1
        assert "while stopping" not in srv.stderr_text()
        srv.all_gone()


def test_ctrl_c_to_the_process_group_drains_once() -> None:
    """Bug caught: a Ctrl-C reaching the workers and, forwarded, again: a second signal that
    aborts the drain."""
    with supervisor("--workers", "2", preexec_fn=os.setsid) as srv:
        srv.wait_started()
        wait_for(lambda: len(worker_pids(srv)) == 2, what="two workers listening")
        with drain_with_a_busy_connection(srv) as sock:
            os.killpg(srv.pid, signal.SIGINT)
            srv.wait_log(r"draining 1 connections")
            sock.sendall(frame(b"second")[6:])
            assert recv_frame(sock) == (False, b"second")
            assert recv_frame(sock) == (True, b"server shutting down")
        assert srv.wait() == 0
        assert "second signal" not in srv.stderr_text()
        srv.all_gone()
