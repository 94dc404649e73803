"""The exec handler: wire format, never blocking, limits, clean-up, safe defaults, client.

Servers are real processes (``python -m muxsrv --handler exec``) on 127.0.0.1
with ephemeral ports; what happened to the commands' processes is read from
``/proc``.  Commands run in a per-test directory (``--exec-cwd``), so files
they write are the test's own.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from support import (
    ROOT,
    Owner,
    ServerProcess,
    frame,
    loopback_pair,
    recv_frame,
    running_server,
    wait_for,
)

from muxsrv import plugins
from muxsrv.cli import build_parser
from muxsrv.client import Client, ExecResult
from muxsrv.connection import Connection
from muxsrv.framing import make_decoder
from muxsrv.handler import ConfigError
from muxsrv.handlers import exec as exec_module
from muxsrv.handlers import exec_config, exec_process
from muxsrv.handlers.exec import ExecHandler, Slots
from muxsrv.handlers.exec_protocol import (
    BLOCK_MAX,
    OutputBuffer,
    Refused,
    ReplyError,
    command_argv,
    decode_reply,
    encode_reply,
)
from muxsrv.loop import EventLoop
from muxsrv.transport import HIGH_WATER

MiB = 1 << 20
SECRET = "muxsrv-test-secret-4417"
pytestmark = pytest.mark.timeout(60)


# -- /proc ---------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, process group) of a process, or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name may hold spaces and ")"
    return fields[0], int(fields[1]), int(fields[2])


def all_processes() -> Iterator[tuple[int, tuple[str, int, int]]]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None:
                yield int(name), stat


def alive_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not dead (a zombie is dead, awaiting its parent)."""
    return [pid for pid, (state, _, pgrp) in all_processes() if pgrp == pgid and state not in "ZX"]


def zombie_children(ppid: int) -> list[int]:
    return [pid for pid, (state, parent, _) in all_processes() if parent == ppid and state == "Z"]


def children(ppid: int) -> list[int]:
    return [pid for pid, (_, parent, _) in all_processes() if parent == ppid]


def peak_rss(pid: int) -> int:
    """VmHWM: the most memory the process has ever had resident."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# -- servers and clients ---------------------------------------------------------


def exec_server(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> AbstractContextManager[ServerProcess]:
    return running_server("--handler", "exec", "--exec-cwd", str(cwd), *args, env=env)


def client(srv: ServerProcess, timeout: float = 30.0) -> Client:
    return Client(srv.host, srv.port, timeout=timeout)


@pytest.fixture(scope="module")
def shared_cwd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exec-cwd")


@pytest.fixture(scope="module")
def srv(shared_cwd: Path) -> Iterator[ServerProcess]:
    """One default exec server for the tests that need no special flags.

    A secret sits in its environment, to show that commands do not see it.
    """
    with exec_server(shared_cwd, env={"SECRET_TOKEN": SECRET}) as server:
        yield server
        assert zombie_children(server.pid) == []


def exec_options(*args: str) -> argparse.Namespace:
    """Options as `python -m muxsrv --handler exec ARGS` parses them."""
    loaded = plugins.load(plugins.find("exec"))
    return build_parser(loaded).parse_args(["--handler", "exec", *args])


def run_cli(*args: str, stdin: str = "", timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "muxsrv.client", *args], input=stdin.encode(),
        capture_output=True, cwd=ROOT, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def refused_start(*args: str) -> subprocess.CompletedProcess[str]:
    """Start a server that must refuse to start; return how it ended."""
    return subprocess.run(
        [sys.executable, "-m", "muxsrv", "--handler", "exec", "--port", "0", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def started_pid(srv: ServerProcess, command: str) -> int:
    """The PID the server logged for ``command`` (waits for the line)."""
    line = srv.wait_log(rf"pid \d+ started: {re.escape(repr(command))}$")
    return int(line.split(" pid ")[1].split()[0])


# -- the wire format, without a server -------------------------------------------


def test_reply_layout_is_length_json_stdout_stderr() -> None:
    reply = encode_reply(ExecResult(-9, b"out\xff", b"\x00err", timed_out=True))
    (size,) = struct.unpack(">I", reply[:4])
    header = json.loads(reply[4 : 4 + size])
    assert header == {"exit_code": -9, "stdout": 4, "stderr": 4,
                      "timed_out": True, "truncated": False}
    assert reply[4 + size :] == b"out\xff\x00err"
    assert decode_reply(reply) == ExecResult(-9, b"out\xff", b"\x00err", True, False)


@pytest.mark.parametrize("bad", [
    b"",
    b"\x00\x00\x00",
    b"\x00\x00\x00\x10{}",                               # header longer than the reply
    b"\x00\x00\x00\x02{}",                               # keys missing
    b"\x00\x00\x00\x03{x}",                              # not JSON
    encode_reply(ExecResult(0, b"abc")) + b"extra",      # more output than announced
    encode_reply(ExecResult(0, b"abc"))[:-1],            # less
    b"\x00\x00\x00\x4f" + b'{"exit_code":"0","stdout":0,"stderr":0,"timed_out":false,'
    b'"truncated":false}',                               # exit_code not an int
])
def test_decode_reply_rejects_what_is_not_a_reply(bad: bytes) -> None:
    with pytest.raises(ReplyError):
        decode_reply(bad)


def test_exit_status_for_a_shell() -> None:
    assert ExecResult(3).status == 3
    assert ExecResult(-15).status == 143  # killed by SIGTERM: 128+15
    assert ExecResult(-9, timed_out=True).status == 124  # as timeout(1)


def test_output_buffer_fills_blocks_in_place_within_the_limit() -> None:
    rng = random.Random(7)
    data = rng.randbytes(3 * MiB)
    cap = 2 * MiB + 12345
    buf = OutputBuffer()
    pos = 0
    while pos < cap:
        view = buf.get_buffer(cap - pos)
        n = min(len(view), rng.choice([1, 100, 4096, 65536, 300000]), cap - pos)
        view[:n] = data[pos : pos + n]
        buf.buffer_updated(n)
        pos += n
        allocated = sum(len(b) for b in buf._blocks)
        assert allocated <= cap and allocated - buf.size <= BLOCK_MAX
    assert buf.size == cap
    assert buf.getvalue() == data[:cap]
    assert all(len(b) <= BLOCK_MAX for b in buf._blocks)


def test_command_argv_shell_mode_passes_the_bytes() -> None:
    assert command_argv(b"echo \xff; ls", None) == [b"/bin/sh", b"-c", b"echo \xff; ls"]
    with pytest.raises(Refused, match="NUL"):
        command_argv(b"echo a\0b", None)


def test_command_argv_allowlist_mode_splits_words_and_checks_the_program() -> None:
    allowed = {"echo", "/usr/bin/printf"}
    assert command_argv(b"echo x; touch f", allowed) == ["echo", "x;", "touch", "f"]
    assert command_argv(b"echo 'a  b' \"$HOME\"", allowed) == ["echo", "a  b", "$HOME"]
    assert command_argv(b"/usr/bin/printf %s", allowed) == ["/usr/bin/printf", "%s"]
    assert os.fsencode(command_argv(b"echo \xff", allowed)[1]) == b"\xff"
    for refused in (b"touch f", b"/bin/echo hi", b"printf x", b"", b"echo 'open", b"ECHO x"):
        with pytest.raises(Refused):
            command_argv(refused, allowed)


def test_child_environment_is_minimal_unless_asked() -> None:
    server = {"PATH": "/secret/bin", "HOME": "/h", "LANG": "C.UTF-8", "AWS_KEY": "k"}
    assert exec_config.child_environment(server, False, []) == {
        "PATH": exec_config.DEFAULT_PATH, "HOME": "/h", "LANG": "C.UTF-8"}
    env = exec_config.child_environment(server, False, ["AWS_KEY", "A=b=c", "E="])
    assert env["AWS_KEY"] == "k" and env["A"] == "b=c" and env["E"] == ""
    assert exec_config.child_environment(server, True, [])["AWS_KEY"] == "k"
    for bad in (["=x"], ["NOT_SET_ANYWHERE"]):
        with pytest.raises(ConfigError):
            exec_config.child_environment(server, False, bad)


def test_loopback_check() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert exec_config.is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.1", "no-such-host.invalid"):
        assert not exec_config.is_loopback(host), host


def test_allow_remote_exec_lifts_the_refusal_only_with_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--allow-remote-exec"):
        ExecHandler.configure(exec_options("--host", "0.0.0.0"))
    with pytest.raises(ConfigError, match="--auth-token-file"):
        ExecHandler.configure(exec_options("--host", "0.0.0.0", "--allow-remote-exec"))
    tokens = tmp_path / "tokens"
    tokens.write_text("0123456789abcdef\n")
    service = ExecHandler.configure(
        exec_options("--host", "0.0.0.0", "--allow-remote-exec", "--exec-cwd", str(tmp_path),
                     "--auth-token-file", str(tokens))
    )
    assert service.config.cwd == str(tmp_path) and service.config.allowed is None


def test_proxy_protocol_counts_as_remote_exec(tmp_path: Path) -> None:
    # Behind a balancer on this host the listener is loopback but the clients are not.
    with pytest.raises(ConfigError, match=r"--proxy-protocol.*--allow-remote-exec"):
        ExecHandler.configure(exec_options("--proxy-protocol"))
    tokens = tmp_path / "tokens"
    tokens.write_text("0123456789abcdef\n")
    ExecHandler.configure(exec_options("--proxy-protocol", "--allow-remote-exec",
                                       "--auth-token-file", str(tokens)))


# -- one child on a loop of its own ----------------------------------------------


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_child_exit_is_seen_with_and_without_pidfd(
    pidfd: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    loop = EventLoop()
    done: list[exec_process.Child] = []
    try:
        child = exec_process.Child(
            loop, [b"/bin/sh", b"-c", b"echo out; echo err >&2; exit 5"], cwd=str(tmp_path),
            env={"PATH": "/usr/bin:/bin"}, timeout=10, max_output=MiB, on_done=done.append,
        )
        assert (child._pidfd is not None) == pidfd
        assert loop.run_until(lambda: bool(done), 10)
        assert loop.watched_fds == 0
    finally:
        loop.close()
    assert child.returncode == 5
    assert [b.getvalue() for b in child.output] == [b"out\n", b"err\n"]
    assert proc_stat(child.pid) is None  # reaped


class FakeConn:
    """The Conn API, recording what a handler does with it."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.peer = ("127.0.0.1", 1)
        self.framing = "length"
        self.closing = False
        self.trace: list[str] = []
        self.replies: list[bytes] = []
        self.work = 0

    def send(self, payload: bytes, *more: bytes) -> None:
        self.replies.append(b"".join((payload, *more)))

    def send_error(self, text: str) -> None:
        self.trace.append(f"error {text}")

    def pause_reading(self) -> None:
        self.trace.append(f"pause at {self.work}")

    def resume_reading(self) -> None:
        self.trace.append(f"resume at {self.work}")

    def work_started(self) -> None:
        self.work += 1

    def work_done(self) -> None:
        self.work -= 1


def test_a_connection_queue_is_bounded_by_pausing_and_answered_in_order(tmp_path: Path) -> None:
    factory = ExecHandler.configure(exec_options("--exec-cwd", str(tmp_path)))
    loop = EventLoop()
    conn = FakeConn(loop)
    handler = factory()
    handler.connection_made(conn)  # type: ignore[arg-type]
    try:
        for i in range(40):  # one batch, as a pipelining client's first recv may be
            handler.message_received(conn, b"echo %d" % i)  # type: ignore[arg-type]
        assert conn.trace == ["pause at 32"]  # the 32nd pending command stops reading
        assert loop.run_until(lambda: conn.work == 0, 30)
    finally:
        loop.close()
    assert conn.trace == ["pause at 32", "resume at 9"]  # 8 still queued + the one answered
    assert [decode_reply(r).stdout for r in conn.replies] == [b"%d\n" % i for i in range(40)]


# -- back-pressure: a client that does not read ----------------------------------

PIPELINED = 200
OUTPUT_EACH = 256 * 1024


def numbered_output(i: int) -> bytes:
    """What ``yes I | head -c OUTPUT_EACH`` writes: tells every reply from the others."""
    line = b"%d\n" % i
    return (line * (OUTPUT_EACH // len(line) + 1))[:OUTPUT_EACH]


def numbered_commands() -> list[bytes]:
    return [b"yes %d | head -c %d" % (i, OUTPUT_EACH) for i in range(PIPELINED)]


def test_no_command_starts_while_the_output_waits_above_high_water(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug caught: commands starting however much of their output the client left unread.

    200 pipelined commands of 256 KiB each, on a real Connection whose peer reads
    nothing: the server used to run them all and hold the whole 50 MiB.
    """
    started: list[exec_process.Child] = []

    class CountedChild(exec_process.Child):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(exec_module, "Child", CountedChild)
    factory = ExecHandler.configure(exec_options("--exec-cwd", str(tmp_path)))
    handler = factory()
    loop = EventLoop()
    owner = Owner(loop)
    sock, peer = loopback_pair(buffer=128 * 1024)
    conn = Connection(owner, sock, sock.getpeername(), make_decoder("length", MiB), None, handler)
    peak = 0

    def held() -> int:
        """What this connection costs: output not yet sent, plus running commands' output."""
        return conn.pending + sum(child.size for child in started if child.returncode is None)

    def turn() -> None:
        nonlocal peak
        loop.run_once(max_wait=0.05)
        peak = max(peak, held())

    def run_until(done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            turn()
        return done()

    try:
        conn.start()
        peer.sendall(b"".join(frame(c) for c in numbered_commands()))
        # Quiet once no command runs: everything ran, or the rest wait for the reader.
        assert run_until(lambda: bool(started) and loop.watched_fds == 0, 30)
        stalled, stalled_peak = len(started), peak
        # Only what the kernel took and the high-water mark's worth ran, not 200.
        assert stalled <= 12, stalled
        assert conn.pending > HIGH_WATER
        assert stalled_peak <= HIGH_WATER + OUTPUT_EACH + 4096, stalled_peak
        assert handler._queued_bytes <= exec_module.PAUSE_BYTES  # the queue, too, is bounded
        assert len(handler._queue) <= exec_module.PAUSE_AT

        # Now the client reads: every reply arrives, complete and in order.
        peer.setblocking(False)
        received = bytearray()
        replies: list[bytes] = []

        def read_replies() -> bool:
            for _ in range(16):  # bounded per turn
                try:
                    data = peer.recv(1 << 20)
                except BlockingIOError:
                    break
                assert data, "the server closed the connection"
                received.extend(data)
            while len(received) >= 4:
                (size,) = struct.unpack(">I", received[:4])
                assert not size & 0x80000000, bytes(received[4 : 4 + (size & 0x7FFFFFFF)])
                if len(received) < 4 + size:
                    break
                replies.append(bytes(received[4 : 4 + size]))
                del received[: 4 + size]
            return len(replies) == PIPELINED

        assert run_until(read_replies, 50), f"{len(replies)} replies"
        assert conn.owes_nothing() and not received
    finally:
        peer.close()
        loop.run_until(lambda: bool(owner.closed), 5)
        loop.run_once(max_wait=0)  # connection_lost
        conn.abort()
        loop.close()
    print(f"\n{PIPELINED} x {OUTPUT_EACH >> 10} KiB pipelined, client not reading: "
          f"{stalled} commands ran, server held at most {stalled_peak / MiB:.2f} MiB; "
          f"{peak / MiB:.2f} MiB at most while the client read all {len(replies)}")
    assert len(started) == PIPELINED
    for i, reply in enumerate(replies):
        result = decode_reply(reply)
        assert (result.exit_code, result.truncated) == (0, False), i
        assert result.stdout == numbered_output(i), i
    assert peak <= HIGH_WATER + OUTPUT_EACH + 4096, peak


def test_the_idle_timeout_spares_no_work_that_waits_for_a_client_reading_nothing(
    tmp_path: Path,
) -> None:
    """Bug caught: commands queued behind unread output counting as work in progress, so
    a client that never reads held its connection (and queue) for ever."""
    factory = ExecHandler.configure(exec_options("--exec-cwd", str(tmp_path)))
    loop = EventLoop()
    owner = Owner(loop)
    sock, peer = loopback_pair(buffer=128 * 1024)
    conn = Connection(owner, sock, sock.getpeername(), make_decoder("length", MiB), None,
                      factory())
    try:
        conn.start()
        peer.sendall(b"".join(frame(c) for c in numbered_commands()[:20]))
        assert loop.run_until(lambda: conn.pending > HIGH_WATER and loop.watched_fds == 0, 30)
        assert not conn.owes_nothing()  # commands wait: work in progress
        conn.check_idle(conn.last_active + 299, 300)
        assert not conn.closing
        conn.check_idle(conn.last_active + 300, 300)
        assert conn.closing
    finally:
        peer.close()
        conn.abort()
        loop.run_once(max_wait=0)  # connection_lost
        loop.close()


def test_commands_waiting_on_output_count_their_bytes_against_the_queue(tmp_path: Path) -> None:
    """Bug caught: a queue bounded only by its count (32 command lines of up to
    --max-frame each) while writing is paused and nothing runs."""
    factory = ExecHandler.configure(exec_options("--exec-cwd", str(tmp_path)))
    loop = EventLoop()
    conn = FakeConn(loop)
    handler = factory()
    handler.connection_made(conn)  # type: ignore[arg-type]
    try:
        handler.pause_writing(conn)  # type: ignore[arg-type]
        long_command = b"echo " + b"x" * 20_000
        for _ in range(4):
            handler.message_received(conn, long_command)  # type: ignore[arg-type]
        assert conn.trace == ["pause at 4"]  # 80 KB queued: stop reading
        assert loop.watched_fds == 0  # and nothing runs while writing is paused
        handler.resume_writing(conn)  # type: ignore[arg-type]
        assert loop.run_until(lambda: conn.work == 0, 30)
    finally:
        loop.close()
    assert conn.trace == ["pause at 4", "resume at 1"]  # 0 queued + the one answered
    assert [decode_reply(r).stdout for r in conn.replies] == [b"x" * 20_000 + b"\n"] * 4


def test_a_slot_granted_while_writing_is_paused_is_given_back(tmp_path: Path) -> None:
    """Bug caught: a command waiting for a slot starting although its connection's
    output went above high water meanwhile."""
    factory = ExecHandler.configure(
        exec_options("--exec-cwd", str(tmp_path), "--exec-max-procs", "1"))
    loop = EventLoop()
    a, b = FakeConn(loop), FakeConn(loop)
    first, second = factory(), factory()
    try:
        for handler, conn in ((first, a), (second, b)):
            handler.connection_made(conn)  # type: ignore[arg-type]
        first.message_received(a, b"echo a")  # type: ignore[arg-type]
        second.message_received(b, b"echo b")  # type: ignore[arg-type]  # waits: no slot
        second.pause_writing(b)  # type: ignore[arg-type]
        assert loop.run_until(lambda: a.work == 0, 30)
        assert factory.slots.running == 0 and b.work == 1 and loop.watched_fds == 0
        second.resume_writing(b)  # type: ignore[arg-type]
        assert loop.run_until(lambda: b.work == 0, 30)
    finally:
        loop.close()
    assert [decode_reply(r).stdout for r in a.replies + b.replies] == [b"a\n", b"b\n"]
    assert factory.slots.running == 0


def test_a_client_that_reads_nothing_costs_about_the_high_water_mark(tmp_path: Path) -> None:
    """The same, end to end: the server's peak memory, then every reply in order."""
    with exec_server(tmp_path) as srv, srv.connect() as warm:
        warm.sendall(frame(b"true"))
        assert not recv_frame(warm)[0]
        before = srv.rss_bytes()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
            s.settimeout(30)
            s.connect(srv.address)
            s.sendall(b"".join(frame(c) for c in numbered_commands()))
            # Quiet: every command that started has ended, and the server has no child (all
            # 200 ran, on the old code).  At least 5 ran: 4 replies fit under the high-water
            # mark, and the kernel took some.
            wait_for(lambda: srv.log_count(r"started: 'yes") >= 5
                     and srv.log_count(r"exit 0 in") == srv.log_count(r"started: ")
                     and not children(srv.pid), 30, what="no command running")
            # And it stays quiet: a command on another connection, there and back, and
            # no other one started meanwhile (the server logs in order).  The kernel may
            # still be taking output into its buffers (they grow), which rightly resumes
            # the connection for another command or two: quiet is a round trip with none.
            for attempt in range(20):
                ran = srv.log_count(r"started: 'yes")
                warm.sendall(frame(b"true round trip %d" % attempt))
                assert not recv_frame(warm)[0]
                pid = started_pid(srv, f"true round trip {attempt}")
                srv.wait_log(rf"pid {pid} exit 0 in")
                if srv.log_count(r"started: 'yes") == ran:
                    break
            else:
                raise AssertionError(f"commands kept starting: {ran} of {PIPELINED} ran")
            assert ran < PIPELINED // 2, ran  # stopped: most never ran while unread
            replies = [recv_frame(s) for _ in range(PIPELINED)]
        grew = peak_rss(srv.pid) - before
    print(f"\n{PIPELINED} x {OUTPUT_EACH >> 10} KiB pipelined, not read: {ran} ran, server "
          f"peak RSS {grew / MiB:.1f} MiB above its idle RSS")
    assert grew < 16 * MiB, grew / MiB  # not the 50 MiB of output
    for i, (is_error, reply) in enumerate(replies):
        assert not is_error and decode_reply(reply).stdout == numbered_output(i), i


def test_a_command_that_cannot_start_gets_an_error_frame_and_frees_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = iter([OSError(errno.EMFILE, "Too many open files"), RuntimeError("odd")])

    def failing_child(*args: object, **kwargs: object) -> None:
        raise next(failures)

    monkeypatch.setattr(exec_module, "Child", failing_child)
    factory = ExecHandler.configure(
        exec_options("--exec-cwd", str(tmp_path), "--exec-max-procs", "1"))
    loop = EventLoop()
    conn = FakeConn(loop)
    handler = factory()
    try:
        handler.connection_made(conn)  # type: ignore[arg-type]
        for command in (b"one", b"two"):
            handler.message_received(conn, command)  # type: ignore[arg-type]
    finally:
        loop.close()
    assert conn.trace == ["error cannot start the command: Too many open files",
                          "error cannot start the command: odd"]
    assert conn.work == 0 and factory.slots.running == 0


def test_slots_first_come_first_served() -> None:
    granted: list[str] = []

    class Waiter:
        def __init__(self, name: str) -> None:
            self.name = name

        def slot_granted(self) -> None:
            granted.append(self.name)

    slots = Slots(1)
    a, b, c = Waiter("a"), Waiter("b"), Waiter("c")
    for waiter in (a, b, c):
        slots.request(waiter)  # type: ignore[arg-type]
    assert granted == ["a"] and slots.running == 1
    slots.cancel(c)  # type: ignore[arg-type]
    slots.request(a)  # type: ignore[arg-type]  # a's next command: behind b
    slots.release()
    slots.release()
    assert granted == ["a", "b", "a"] and slots.running == 1


# -- results: exit codes, streams, bytes -----------------------------------------


def test_exit_codes_and_signals(srv: ServerProcess) -> None:
    with client(srv) as c:
        assert c.exec("true") == ExecResult(0)
        assert c.exec("exit 3").exit_code == 3
        assert c.exec("kill -TERM $$").exit_code == -signal.SIGTERM
        assert c.exec("kill -KILL $$").exit_code == -signal.SIGKILL
        assert c.exec("no-such-command-here").exit_code == 127  # the shell says so


def test_stdout_and_stderr_never_mix(srv: ServerProcess) -> None:
    with client(srv) as c:
        result = c.exec("echo out1; echo err1 >&2; echo out2; echo err2 >&2")
    assert (result.stdout, result.stderr) == (b"out1\nout2\n", b"err1\nerr2\n")


def test_binary_and_non_utf8_output_arrive_exactly(srv: ServerProcess) -> None:
    up = "".join(f"\\{b:03o}" for b in range(256))  # printf's octal escapes
    down = "".join(f"\\{b:03o}" for b in reversed(range(256)))
    with client(srv) as c:
        gbk = c.exec(r"printf '\304\343\272\303'")  # "你好" in GBK
        binary = c.exec(f"printf '{up}'; printf '{down}' >&2")
        raw_command = c.exec(b"printf '%s' '\xff\xfe caf\xe9'")  # the command's bytes pass too
    assert gbk.stdout == "你好".encode("gbk") == b"\xc4\xe3\xba\xc3"
    assert binary.stdout == bytes(range(256))
    assert binary.stderr == bytes(reversed(range(256)))
    assert raw_command.stdout == b"\xff\xfe caf\xe9"


def test_stdin_is_dev_null(srv: ServerProcess) -> None:
    with client(srv, timeout=5) as c:
        assert c.exec("cat").stdout == b""  # returns at once: nothing to wait for
        assert c.exec("readlink /proc/$$/fd/0").stdout == b"/dev/null\n"


def test_megabytes_on_both_streams_do_not_deadlock(srv: ServerProcess) -> None:
    n = 3_000_000
    command = (f"head -c {n} /dev/zero | tr '\\0' o & head -c {n} /dev/zero | tr '\\0' e >&2; "
               "wait")
    with client(srv) as c:
        started = time.monotonic()
        result = c.exec(command)
        took = time.monotonic() - started
    assert result.exit_code == 0 and not result.truncated and not result.timed_out
    assert result.stdout == b"o" * n and result.stderr == b"e" * n
    assert took < 5, took


def test_working_directory_and_minimal_environment(srv: ServerProcess, shared_cwd: Path) -> None:
    with client(srv) as c:
        assert c.exec("pwd").stdout.decode().strip() == str(shared_cwd)
        env = dict(line.split("=", 1) for line in c.exec("env").stdout.decode().splitlines())
    assert SECRET not in str(env) and "SECRET_TOKEN" not in env
    assert env["PATH"] == exec_config.DEFAULT_PATH
    assert "PYTHONPATH" not in env and "TERM" not in env


def test_every_command_is_logged_with_peer_exit_code_and_duration(srv: ServerProcess) -> None:
    with client(srv) as c:
        c.exec("exit 7")
        port = c._sock.getsockname()[1]
    srv.wait_log(rf"exec 127\.0\.0\.1:{port}: pid \d+ started: 'exit 7'")
    srv.wait_log(rf"exec 127\.0\.0\.1:{port}: pid \d+ exit 7 in \d+\.\d+ s")


# -- concurrency and order --------------------------------------------------------


def test_pipelined_commands_run_one_at_a_time_and_answer_in_order(
    srv: ServerProcess, shared_cwd: Path
) -> None:
    log = shared_cwd / "order.log"
    count = 80  # more than a connection may queue before it stops reading
    commands = [f"echo {i} start >> order.log; sleep 0.00{random.randint(0, 5)}; "
                f"echo {i} end >> order.log; echo {i}".encode() for i in range(count)]
    with client(srv) as c:
        replies = c.pipeline(commands)
    assert [decode_reply(r).stdout for r in replies] == [b"%d\n" % i for i in range(count)]
    expected = [f"{i} {what}" for i in range(count) for what in ("start", "end")]
    assert log.read_text().splitlines() == expected


def test_a_slow_command_does_not_hold_up_other_clients(srv: ServerProcess) -> None:
    slow = client(srv)
    slow.send(b"sleep 5")
    leader = started_pid(srv, "sleep 5")
    with slow, client(srv) as c:
        started = time.monotonic()
        one_by_one = [c.exec("echo hi") for _ in range(20)]
        sequential = time.monotonic() - started
        started = time.monotonic()
        pipelined = c.pipeline([b"echo hi"] * 20)
        together = time.monotonic() - started
        assert proc_stat(leader) is not None  # the slow one is still running ...
        slow.abort()  # ... until its client resets the connection
        wait_for(lambda: proc_stat(leader) is None, 3, what="the abandoned sleep reaped")
    print(f"\n20 x 'echo hi' while 'sleep 5' runs: {sequential * 1000:.0f} ms one by one, "
          f"{together * 1000:.0f} ms pipelined")
    assert all(r.stdout == b"hi\n" for r in one_by_one)
    assert all(decode_reply(r).stdout == b"hi\n" for r in pipelined)
    assert sequential < 1.0 and together < 1.0


def test_max_procs_makes_the_others_wait(tmp_path: Path) -> None:
    with exec_server(tmp_path, "--exec-max-procs", "1") as srv, client(srv) as a, \
            client(srv, timeout=0.5) as b:
        a.send(b"while [ ! -e go ]; do sleep 0.01; done; echo a")
        started_pid(srv, "while [ ! -e go ]; do sleep 0.01; done; echo a")
        b.send(b"echo b")
        with pytest.raises(TimeoutError):  # no slot: b must not run while a does
            b.recv()
        assert srv.log_count("started: 'echo b'") == 0
        (tmp_path / "go").touch()
        assert decode_reply(a.recv()).stdout == b"a\n"
        b._sock.settimeout(10)
        assert decode_reply(b.recv()).stdout == b"b\n"


# -- limits: timeout, output cap ---------------------------------------------------


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    with exec_server(tmp_path, "--exec-timeout", "1") as srv, client(srv) as c:
        started = time.monotonic()
        result = c.exec("echo before; echo $$; sleep 30 & echo $!; sleep 30")
        took = time.monotonic() - started
        assert result.timed_out and result.exit_code == -signal.SIGKILL
        assert not result.truncated and 0.9 < took < 3, took
        before, leader, grandchild = result.stdout.decode().split()
        assert before == "before"  # the output that came before the kill
        assert proc_stat(int(leader)) is None  # reaped by the server
        wait_for(lambda: not alive_in_group(int(leader)), 5, what="the group dead")
        stat = proc_stat(int(grandchild))
        assert stat is None or stat[0] == "Z"  # a zombie awaits init, not us
        assert zombie_children(srv.pid) == []
        srv.wait_log(r"exit -9 in 1\.\d+ s \(\d+\+0 bytes out, timed out\)")
        # The client shows it as timeout(1) does.
        cli = run_cli("--port", str(srv.port), "--exec", "echo partial; sleep 30")
        assert cli.returncode == 124 and cli.stdout == b"partial\n"
        assert b"timed out" in cli.stderr


def test_output_cap_kills_and_truncates_and_bounds_server_memory(tmp_path: Path) -> None:
    cap = 32 * MiB
    with exec_server(tmp_path, "--exec-max-output", "32M") as srv, client(srv) as c:
        c.exec("true")
        before = srv.rss_bytes()
        started = time.monotonic()
        result = c.exec("echo $$ >&2; exec cat /dev/zero")
        took = time.monotonic() - started
        grew = peak_rss(srv.pid) - before
        print(f"\ncat /dev/zero with --exec-max-output 32M: reply in {took * 1000:.0f} ms, "
              f"server peak RSS {grew / MiB:.1f} MiB above its idle RSS")
        assert result.truncated and not result.timed_out
        assert result.exit_code == -signal.SIGKILL
        leader = int(result.stderr)
        assert len(result.stdout) + len(result.stderr) == cap
        assert result.stdout == bytes(len(result.stdout))
        assert grew < cap + 6 * MiB, grew / MiB  # one copy of the output, not two
        assert proc_stat(leader) is None and not alive_in_group(leader)


def test_output_cap_counts_both_streams_and_keeps_the_first_bytes(tmp_path: Path) -> None:
    with exec_server(tmp_path, "--exec-max-output", "6") as srv, client(srv) as c:
        started = time.monotonic()
        cut = c.exec("printf 1234; sleep 0.2; printf 5678 >&2; sleep 30")
        assert time.monotonic() - started < 5
        assert (cut.stdout, cut.stderr, cut.truncated) == (b"1234", b"56", True)
        exact = c.exec("printf 12; printf 3456 >&2")  # exactly the cap is not too much
        assert (exact.stdout, exact.stderr, exact.truncated) == (b"12", b"3456", False)
        assert exact.exit_code == 0


# -- clients that go away, shutdown ----------------------------------------------


def test_client_reset_kills_the_command_and_drops_the_queue(
    srv: ServerProcess, shared_cwd: Path
) -> None:
    gone = client(srv)
    gone.send(b"echo $$ > gone.pid; sleep 30 & echo $! > gone.bg; wait")
    gone.send(b"echo second > gone.second")
    wait_for(lambda: (shared_cwd / "gone.bg").exists() and (shared_cwd / "gone.bg").read_text(),
             what="the command started")
    leader = int((shared_cwd / "gone.pid").read_text())
    grandchild = int((shared_cwd / "gone.bg").read_text())
    gone.abort()  # a reset: the read fails on the server
    wait_for(lambda: proc_stat(leader) is None, 5, what="the command killed and reaped")
    wait_for(lambda: not alive_in_group(leader), 5, what="its whole group killed")
    stat = proc_stat(grandchild)
    assert stat is None or stat[0] == "Z"  # dead; a zombie awaits init, not us
    srv.wait_log(r"1 queued commands dropped")
    srv.wait_log(rf"pid {leader} killed, client gone after")
    with client(srv) as c:  # everything the reset caused is done by the time this is
        assert c.exec("true after-reset").exit_code == 0
    srv.wait_log("started: 'true after-reset'")  # log lines before it have been read
    assert srv.log_count("started: 'echo second") == 0
    assert not (shared_cwd / "gone.second").exists()


def test_half_closed_client_still_gets_every_reply(srv: ServerProcess) -> None:
    with client(srv) as c:
        c.send(b"sleep 0.2; echo one")
        c.send(b"echo two")
        c.shutdown_write()
        assert decode_reply(c.recv()).stdout == b"one\n"
        assert decode_reply(c.recv()).stdout == b"two\n"
        assert c._sock.recv(1) == b""  # then the server closes


def test_shutdown_drains_then_kills_and_reaps_every_child(tmp_path: Path) -> None:
    with exec_server(tmp_path, "--drain-timeout", "1") as srv, client(srv) as quick, \
            client(srv) as stuck:
        stuck.send(b"echo $$ > stuck.pid; sleep 30 & wait")
        quick.send(b"sleep 0.5; echo done")
        wait_for(lambda: (tmp_path / "stuck.pid").exists()
                 and (tmp_path / "stuck.pid").read_text(), what="the stuck command started")
        leader = int((tmp_path / "stuck.pid").read_text())
        started_pid(srv, "sleep 0.5; echo done")  # received before the drain stops reading
        started = time.monotonic()
        srv.signal(signal.SIGTERM)
        assert decode_reply(quick.recv()).stdout == b"done\n"  # finished within the drain
        with pytest.raises((ConnectionError, OSError)):
            stuck.recv()  # killed at the drain timeout: no reply
        assert srv.wait(10) == 0
        took = time.monotonic() - started
        assert 0.9 < took < 3.5, took
        # Reaped by the server itself before it exited, not left to init.
        assert proc_stat(leader) is None
        assert not alive_in_group(leader)
        srv.wait_log(rf"pid {leader} killed, client gone")


# -- safe defaults -------------------------------------------------------------


def test_refuses_a_non_loopback_host() -> None:
    done = refused_start("--host", "0.0.0.0")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-remote-exec" in lines[0] and "0.0.0.0" in lines[0]


@pytest.mark.parametrize("framing", ["line", "raw"])
def test_refuses_framings_other_than_length(framing: str) -> None:
    done = refused_start("--framing", framing)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"muxsrv: error: the exec handler needs --framing length (its replies carry binary "
        f"output), not --framing {framing}"]


@pytest.mark.parametrize("args, says", [
    (["--exec-timeout", "0"], "--exec-timeout"),
    (["--exec-cwd", "/no/such/dir"], "--exec-cwd"),
    (["--exec-allow", "no-such-program-4417"], "--exec-allow"),
    (["--exec-env", "=x"], "--exec-env"),
    (["--exec-max-output", "2G"], "--exec-max-output"),
])
def test_refuses_bad_exec_options(args: list[str], says: str) -> None:
    done = refused_start(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr


def test_allowlist_runs_listed_programs_without_a_shell(tmp_path: Path) -> None:
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    with exec_server(tmp_path, "--exec-allow", "echo", "--exec-allow", "./tool") as srv, \
            client(srv) as c:
        injected = c.exec("echo x; touch f")
        assert (injected.exit_code, injected.stdout) == (0, b"x; touch f\n")
        assert c.exec("echo $HOME 'a  b' `id`").stdout == b"$HOME a  b `id`\n"
        assert c.exec(b"echo \xff\xfe").stdout == b"\xff\xfe\n"
        for command in ("touch f", "/bin/echo hi", "sh -c 'touch f'", "echo 'open"):
            refused = c.exec(command)
            assert refused.exit_code == 127 and refused.stdout == b"", command
            assert b"nothing was run" in refused.stderr
        assert b"'touch' is not an allowed program" in c.exec("touch f").stderr
        assert not (tmp_path / "f").exists()
        wait_for(lambda: srv.log_count("refused") == 5, what="5 refusals logged")
        assert srv.log_count(r"started: 'touch") == 0
        assert c.exec("./tool").stdout == b"tool ran\n"
        tool.chmod(0o644)  # no longer executable: as a shell says, 126
        assert c.exec("./tool").exit_code == 126
        tool.unlink()  # gone: 127
        gone = c.exec("./tool")
        assert gone.exit_code == 127 and b"No such file" in gone.stderr


def test_environment_flags(tmp_path: Path) -> None:
    with exec_server(tmp_path, "--exec-inherit-env", "--exec-env", "FOO=bar",
                     env={"SECRET_TOKEN": SECRET}) as srv, client(srv) as c:
        out = c.exec("echo $FOO $SECRET_TOKEN").stdout
    assert out == f"bar {SECRET}\n".encode()


# -- the command-line client -------------------------------------------------------


def test_cli_is_like_ssh(srv: ServerProcess) -> None:
    port = str(srv.port)
    done = run_cli("--port", port, "--exec", "echo out; echo err >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    assert run_cli("--port", port, "--exec", "kill -TERM $$").returncode == 128 + 15
    assert run_cli("--port", port, "--exec", "--", "printf", "%s-%s", "a", "b").stdout == b"a-b"
    binary = run_cli("--port", port, "--exec", r"printf '\377\000\001'")
    assert binary.stdout == b"\xff\x00\x01"


def test_cli_commands_from_stdin(srv: ServerProcess) -> None:
    done = run_cli("--port", str(srv.port), "--exec", stdin="echo hi\n\necho oops >&2; exit 4\n")
    assert done.stdout == b"hi\n"  # piped: no prompts
    assert done.stderr == b"oops\n" and done.returncode == 4


def test_cli_interrupted_kills_the_remote_command(srv: ServerProcess, shared_cwd: Path) -> None:
    cli = subprocess.Popen(
        [sys.executable, "-m", "muxsrv.client", "--port", str(srv.port), "--exec",
         "echo $$ > cli.pid; sleep 30"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        pidfile = shared_cwd / "cli.pid"
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the command started")
        leader = int(pidfile.read_text())
        cli.send_signal(signal.SIGINT)  # Ctrl-C
        assert cli.wait(10) == 130
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    wait_for(lambda: proc_stat(leader) is None, 5, what="the remote command killed")


def test_cli_cannot_reach_the_server_exits_255() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        done = run_cli("--port", str(s.getsockname()[1]), "--exec", "true")
    assert done.returncode == 255 and b"cannot reach" in done.stderr
