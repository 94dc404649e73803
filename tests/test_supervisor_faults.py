"""--workers when something goes wrong: the hand-over, a first generation that cannot start,
a supervisor that fails, a stray MUXSRV_LISTEN_FDS.  (The decisions themselves, with a fake
clock: tests/test_generations.py.)

Catches: generation 1 failing at start and restarted forever, never reported (or reported in
several lines); a supervisor exception SIGKILLing workers with connections still to drain;
pipe descriptors leaked, or the supervisor brought down, by a spawn that fails; workers
started without the interpreter's -O/-X/-W; any process adopting the descriptors named by a
MUXSRV_LISTEN_FDS it was not given by its supervisor; the variables reaching exec's commands.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, frame, recv_frame, wait_for
from test_workers import TOKEN, drain_with_a_busy_connection, supervisor, tagged, worker_pids

from muxsrv import handover
from muxsrv.client import Client
from muxsrv.handover import ENV_LISTEN, ENV_READY, ENV_SUPERVISOR, Handover, inherited
from muxsrv.server import Settings
from muxsrv.supervisor import _Supervisor

pytestmark = pytest.mark.timeout(90)


@contextlib.contextmanager
def tagged_server(argv: Sequence[str], env: dict[str, str] | None = None,
                  pass_fds: Sequence[int] = ()) -> Iterator[ServerProcess]:
    """A muxsrv run with the whole ``argv``; it and every process with its token are
    killed at the end."""
    token = uuid.uuid4().hex
    srv = ServerProcess([], env={**(env or {}), TOKEN: token}, argv=argv, pass_fds=pass_fds)
    srv.token = token
    try:
        yield srv
    finally:
        srv.kill()
        for pid in tagged(token):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def all_gone(srv: ServerProcess) -> None:
    wait_for(lambda: not tagged(srv.token), what="no worker left")


def env_with(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "PYTHONDONTWRITEBYTECODE": "1",
            **extra}


# -- a first generation that cannot start ----------------------------------------------

#: Imports in the supervisor (which loads the handler to check the options) and fails in
#: every worker: the handler as it is on disk when the workers start.
WORKERS_ONLY_FAIL = """
import os

MARK = os.environ["MUXSRV_TEST_MARK"]
if os.path.exists(MARK):
    raise RuntimeError("only the supervisor imports me")
open(MARK, "w").close()

def tag(payload: bytes) -> bytes:
    return payload
"""


def test_a_first_generation_that_cannot_start_exits_1_with_one_line(tmp_path: Path) -> None:
    """Bug caught: the workers restarted with a back-off forever, the supervisor never
    saying that they cannot start, nor why (nor exiting for systemd to see)."""
    (tmp_path / "flaky.py").write_text(WORKERS_ONLY_FAIL)
    env = env_with(tmp_path, MUXSRV_TEST_MARK=str(tmp_path / "imported"))
    with supervisor("--workers", "2", "--handler", "flaky:tag", env=env) as srv:
        assert srv.wait(timeout=40) == 1
        lines = srv.stderr_text().splitlines()
        loud = [line for line in lines if re.search(r"error|ERROR|WARNING|Traceback", line)]
        assert len(loud) == 1, lines
        assert re.fullmatch(
            r"muxsrv: error: the workers cannot start: worker \d+ exited with status 2 "
            r"\(handler 'flaky:tag' .*: importing module 'flaky' failed: RuntimeError: only "
            r"the supervisor imports me\)", loud[0]), loud[0]
        assert "muxsrv: error:" in lines[-1]
        srv.all_gone()


# -- a supervisor that fails -----------------------------------------------------------

BROKEN_SUPERVISOR = """
import sys
from muxsrv import cli, generations

def reload(self, now):
    raise RuntimeError("supervisor broken on purpose")

generations.Generations.reload = reload  # SIGHUP raises in the supervisor's loop
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("then", ["drain", "stop signal"])
def test_a_supervisor_that_fails_lets_its_workers_drain(then: str) -> None:
    """Bug caught: every worker SIGKILLed at once on any exception in the supervisor,
    resetting connections that a drain would have answered."""
    argv = [sys.executable, "-c", BROKEN_SUPERVISOR, "--port", "0", "--workers", "2",
            "--drain-timeout", "30"]
    with tagged_server(argv) as srv:
        srv.wait_started()
        wait_for(lambda: len(worker_pids(srv)) == 2, what="two workers listening")
        srv.wait_log(r"generation 1 serving")
        with drain_with_a_busy_connection(srv) as sock:
            srv.signal(signal.SIGHUP)
            srv.wait_log(r"draining 1 connections")  # (not SIGKILLed)
            if then == "drain":
                sock.sendall(frame(b"second")[6:])
                assert recv_frame(sock) == (False, b"second")
                assert recv_frame(sock) == (True, b"server shutting down")
                assert srv.wait(timeout=20) == 1
            else:  # the drain timeout is 30 s: a stop signal kills at once
                srv.signal(signal.SIGTERM)
                assert srv.wait(timeout=10) == 1
                assert sock.recv(100) == b""
        assert "supervisor broken on purpose" in srv.stderr_text()
        assert srv.log_count(r"the supervisor failed; stopping its 2 workers") == 1
        all_gone(srv)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_spawn_that_fails_leaks_no_descriptor_and_is_a_spawn_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bug caught: os.pipe() failing (EMFILE) raising out of spawn() and stopping the
    supervisor; the pipe's read end leaked when Popen raises something unexpected."""
    sup = _Supervisor(Settings(port=0), 1, [], [])
    failures: list[str] = []
    monkeypatch.setattr(sup.gens, "spawn_failed",
                        lambda generation, now, reason: failures.append(reason))
    before = open_fds()

    def no_pipe() -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    def no_process(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("unexpected")

    with monkeypatch.context() as patch:
        patch.setattr(os, "pipe", no_pipe)
        sup.spawn(1)
    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "Popen", no_process)
        sup.spawn(1)
    assert failures == ["[Errno 24] Too many open files",
                        "[Errno 11] Resource temporarily unavailable"]
    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "Popen", broken)
        with pytest.raises(ValueError):
            sup.spawn(1)
    assert open_fds() == before
    assert sup.procs == {} and sup.pipes == {}


# -- what a worker is handed -----------------------------------------------------------

FLAGS_HANDLER = """
import sys

def flags(payload: bytes) -> bytes:
    return repr((sys.flags.optimize, sys.flags.dev_mode, sys.warnoptions)).encode()
"""


def test_workers_keep_the_interpreters_flags(tmp_path: Path) -> None:
    """Bug caught: workers started as plain ``python -m muxsrv``, without -O, -X dev, -W."""
    (tmp_path / "flagger.py").write_text(FLAGS_HANDLER)
    argv = [sys.executable, "-O", "-X", "dev", "-W", "ignore::UserWarning", "-m", "muxsrv",
            "--port", "0", "--workers", "2", "--handler", "flagger:flags"]
    with tagged_server(argv, env=env_with(tmp_path)) as srv:
        srv.wait_started()
        wait_for(lambda: len(worker_pids(srv)) == 2, what="two workers listening")
        with Client(*srv.address) as client:
            optimize, dev_mode, warnoptions = ast.literal_eval(client.request(b"?").decode())
        assert (optimize, dev_mode) == (1, True)
        assert "ignore::UserWarning" in warnoptions
        assert srv.stop() == 0
        all_gone(srv)


@pytest.mark.parametrize("parent", ["unset", "1", "junk", "the parent"])
def test_a_stray_listen_fds_is_ignored_unless_set_by_the_parent(parent: str) -> None:
    """Bug caught: a MUXSRV_LISTEN_FDS exported by accident (or left to a worker's
    children) makes muxsrv serve whatever socket that descriptor is, not its own port."""
    with socket.create_server(("127.0.0.1", 0)) as held:
        held_port = held.getsockname()[1]
        env = {ENV_LISTEN: str(held.fileno())}
        if parent != "unset":
            env[ENV_SUPERVISOR] = str(os.getpid()) if parent == "the parent" else parent
        srv = ServerProcess(["--port", "0", "--log-level", "debug"], env=env,
                            pass_fds=[held.fileno()])
        try:
            srv.wait_started()
            if parent == "the parent":  # the test is the one that started it: adopted
                assert srv.port == held_port
            else:
                assert srv.port != held_port
                line = srv.wait_log(r"not a --workers worker")
                assert line.endswith(
                    f"{ENV_LISTEN} set, but {ENV_SUPERVISOR}="
                    f"{None if parent == 'unset' else repr(parent)} is not this process's "
                    f"parent (pid {os.getpid()}); listening on a port of its own"), line
                with Client(*srv.address) as client:
                    assert client.request(b"own") == b"own"
                with socket.create_connection(("127.0.0.1", held_port), timeout=5):
                    held.settimeout(5)
                    conn, _ = held.accept()  # still ours: nobody else took it
                    conn.close()
            assert srv.stop() == 0
        finally:
            srv.kill()


def test_inherited_takes_the_variables_out_of_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (ENV_LISTEN, ENV_READY, ENV_SUPERVISOR):
        monkeypatch.setenv(name, "7")
    handed = inherited()
    assert handed.socks is None and handed.ready_fd == -1
    assert "is not this process's parent" in handed.ignored
    assert not {ENV_LISTEN, ENV_READY, ENV_SUPERVISOR} & set(os.environ)
    monkeypatch.setenv(ENV_READY, "7")
    assert inherited().ignored == f"{ENV_READY} or {ENV_SUPERVISOR} without {ENV_LISTEN}"
    assert inherited() == Handover()


def test_a_workers_failure_goes_to_its_pipe_once() -> None:
    read_end, write_end = os.pipe()
    try:
        handed = Handover([], write_end)
        assert handed.report_failure("x" * 10_000)
        assert handed.ready_fd == -1  # closed: the number may be reused now
        data = os.read(read_end, 20_000)
        assert data == b"E" + b"x" * handover.MAX_FAILURE
        assert os.read(read_end, 1) == b""
        assert not handed.report_failure("again")  # the caller says it on stderr instead
    finally:
        os.close(read_end)


def test_execs_commands_see_none_of_the_variables(tmp_path: Path) -> None:
    with supervisor("--workers", "2", "--handler", "exec", "--exec-cwd", str(tmp_path),
                    "--exec-inherit-env") as srv:
        srv.wait_started()
        wait_for(lambda: len(worker_pids(srv)) == 2, what="two workers listening")
        with Client(*srv.address, timeout=30) as client:
            names = {line.split(b"=")[0] for line in client.exec("env").stdout.splitlines()}
        assert TOKEN.encode() in names  # the worker's environment, inherited
        assert not {b"MUXSRV_LISTEN_FDS", b"MUXSRV_READY_FD", b"MUXSRV_SUPERVISOR_PID"} & names
        assert srv.stop() == 0
        srv.all_gone()
