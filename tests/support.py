"""Helpers shared by the tests: start a real muxsrv process, wait for conditions.

Every server runs on 127.0.0.1 with port 0 (the kernel picks a free port); the
real port is read from the start-up line on stderr.  Processes are stopped by
the PID we started, never by name.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Example plugins (package muxsrv_testplugins) for the server's PYTHONPATH.
PLUGIN_DIR = ROOT / "tests" / "plugins_fixture"
#: Where the example handlers are: f"{PLUGINS}:reverse".
PLUGINS = "muxsrv_testplugins.handlers"
LISTEN_RE = re.compile(r"listening on (\[[^\]]+\]|[^\s:]+):(\d+)")
HDR = struct.Struct(">I")


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


class ServerProcess:
    """A muxsrv started as a user starts it: `python -m muxsrv ARGS` (or the whole `argv`),
    with the descriptors `pass_fds` inherited."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        argv: Sequence[str] | None = None,
        cwd: Path = ROOT,
        pass_fds: Sequence[int] = (),
    ) -> None:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self.args = list(args)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "muxsrv", *self.args] if argv is None else list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            preexec_fn=preexec_fn,
            pass_fds=tuple(pass_fds),
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._started = threading.Event()
        self.host = ""
        self.port = 0
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)
            if not self._started.is_set():
                m = LISTEN_RE.search(line)
                if m:
                    self.host = m.group(1).strip("[]")
                    self.port = int(m.group(2))
                    self._started.set()
        self._started.set()

    def wait_started(self, timeout: float = 15.0) -> ServerProcess:
        if not self._started.wait(timeout) or not self.port:
            self.kill()
            raise AssertionError(f"server did not start; stderr:\n{self.stderr_text()}")
        return self

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def stderr_text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def final_log(self, timeout: float = 10.0) -> str:
        """Everything the process wrote to stderr, once it has exited."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return self.stderr_text()

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        rx = re.compile(pattern)

        def found() -> str | None:
            with self._lock:
                for line in self.lines:
                    if rx.search(line):
                        return line
            return None

        return str(wait_for(found, timeout, what=f"log line matching {pattern!r}"))

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=timeout)
        return sock

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the exit status; by then all of stderr has been read."""
        status = self.proc.wait(timeout)
        self._reader.join(timeout)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL if it hangs)."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server has used so far (/proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            # The command name (field 2) may hold spaces; count fields after its ")".
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def log_count(self, pattern: str) -> int:
        """How many stderr lines so far match ``pattern``."""
        rx = re.compile(pattern)
        with self._lock:
            return sum(1 for line in self.lines if rx.search(line))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@contextmanager
def running_server(
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[ServerProcess]:
    """Start `python -m muxsrv --port 0 ARGS`, yield it started, and always stop it."""
    srv = ServerProcess(["--port", "0", *args], env=env, preexec_fn=preexec_fn)
    try:
        srv.wait_started()
        yield srv
    finally:
        if srv.proc.poll() is None:
            with suppress(subprocess.TimeoutExpired):
                srv.stop()


def plugin_env() -> dict[str, str]:
    """``env=`` for running_server: the example plugins importable, and muxsrv too."""
    return {"PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), str(ROOT)])}


def frame(payload: bytes) -> bytes:
    return HDR.pack(len(payload)) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError(f"EOF with {n} bytes still expected")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[bool, bytes]:
    """Read one length-prefixed frame: (is_error_frame, payload)."""
    (word,) = HDR.unpack(recv_exact(sock, 4))
    is_error = bool(word & 0x80000000)
    return is_error, recv_exact(sock, word & 0x7FFFFFFF)


def recv_until_eof(sock: socket.socket, limit: int = 64 << 20) -> bytes:
    chunks = []
    total = 0
    while total < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


# -- a Connection in-process ------------------------------------------------------


class Owner:
    """What a ``muxsrv.connection.Connection`` needs of the server that accepted it."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.closed: list[Any] = []

    def connection_closed(self, conn: Any) -> None:
        self.closed.append(conn)


def loopback_pair(buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(server side, non-blocking; client side) of a TCP connection on 127.0.0.1.

    With ``buffer``, the kernel's buffers are that small and fixed (no autotuning),
    so the kernel cannot hide how much of the output the server itself holds.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.socket()
        if buffer is not None:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)  # before connect
        peer.connect(listener.getsockname())
        sock, _ = listener.accept()
    if buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
    sock.setblocking(False)
    return sock, peer
