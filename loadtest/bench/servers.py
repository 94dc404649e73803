"""The servers under test, and how to start, watch and stop one of them.

The idea: every server, muxsrv and each peer alike, is a command that binds
127.0.0.1 port 0 and prints ``NAME: listening on HOST:PORT`` on stderr; the
bench parses that line with muxsrv's own pattern, so no server needs special
treatment.  A server runs pinned to its own CPU (``taskset``), is stopped with
SIGTERM to the PID we started (SIGKILL after a grace period) and is always
reaped.  A peer whose Python package is missing is skipped with a note.

Every server gets the glibc malloc settings muxsrv gives itself at start
(``MALLOC_ENV``).  Without them glibc maps and unmaps every buffer over 128 KiB,
so a server that reads with ``recv(256 KiB)`` (asyncio's transports) pays page
faults on each read and runs at a third of its speed or at full speed depending
on the allocator's history; the comparison is of code, not of that accident.

The TLS servers (``tls``) and muxsrv with tokens (``auth``) name their files
with placeholders that a `tlsfiles.BenchFiles` made for the run fills in; they
are driven by ``loadgen-tls`` (the generator built with OpenSSL), and are
skipped with a note where that could not be built.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tlsfiles

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the repository: muxsrv is imported from here
PEERS = HERE / "peers"
BUILD = HERE / "build"
LOADGEN_TLS = BUILD / "loadgen-tls"
LISTEN_RE = re.compile(r"listening on (\[[^\]]+\]|[^\s:]+):(\d+)")
START_TIMEOUT = 30.0  # Twisted's import alone takes a second on a busy machine
STOP_TIMEOUT = 15.0  # muxsrv drains for up to 5 s by default
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: What muxsrv sets with mallopt at start (MMAP_THRESHOLD and TRIM_THRESHOLD in
#: muxsrv/tuning.py), for every server.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


@dataclass(frozen=True)
class ServerSpec:
    """One row of the results: a name, its command, and what it needs."""

    name: str
    argv: tuple[str, ...]
    needs: tuple[str, ...] = ()  # Python modules that must be importable
    upper: bool = False  # replies are the payload upper-cased
    small_only: bool = False  # only the small-message scenarios
    default: bool = True  # run unless --servers says otherwise
    tls: bool = False  # speaks TLS: driven by loadgen-tls, which checks its certificate
    auth: bool = False  # wants AUTH <token> first on every connection

    @property
    def needs_files(self) -> bool:
        return tlsfiles.needs_files(self.argv)

    def missing(self) -> str | None:
        """Why this server cannot run here, or None."""
        for module in self.needs:
            if importlib.util.find_spec(module) is None:
                return f"Python package {module!r} is not installed (pip install '.[bench]')"
        if self.argv[0] != sys.executable and not Path(self.argv[0]).exists():
            return f"{self.argv[0]} was not built"
        if self.tls and not LOADGEN_TLS.exists():
            return f"{LOADGEN_TLS.name} was not built (no OpenSSL headers? install libssl-dev)"
        if self.needs_files:
            return tlsfiles.missing()
        return None


def _py(script: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, str(PEERS / script), *args)


MUXSRV_ARGS = ("--port", "0", "--host", "127.0.0.1", "--max-conns", "200000", "--idle-timeout", "0")
MUXSRV_ECHO = (sys.executable, "-m", "muxsrv", "--handler", "echo", *MUXSRV_ARGS)
TLS_ARGS = ("--tls-cert", "{cert}", "--tls-key", "{key}")

SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("muxsrv", MUXSRV_ECHO),
    ServerSpec(
        "muxsrv-upper",
        (sys.executable, "-m", "muxsrv", "--handler", "upper", *MUXSRV_ARGS),
        upper=True,
        small_only=True,
    ),
    ServerSpec("c-epoll", (str(BUILD / "cecho"), "--port", "0")),
    ServerSpec(
        "c-epoll-blocking", (str(BUILD / "cecho"), "--port", "0", "--no-spin"), default=False
    ),
    ServerSpec("uvloop-protocol", _py("asyncio_protocol.py", "--loop", "uvloop"), ("uvloop",)),
    ServerSpec("asyncio-protocol", _py("asyncio_protocol.py")),
    ServerSpec("asyncio-streams", _py("asyncio_streams.py")),
    ServerSpec("threads-socketserver", _py("threads_socketserver.py")),
    ServerSpec("gevent-streamserver", _py("gevent_server.py"), ("gevent",)),
    ServerSpec("twisted-int32", _py("twisted_int32.py"), ("twisted",)),
    ServerSpec("tornado-iostream", _py("tornado_iostream.py"), ("tornado",)),
    # --tls: the same echo over TLS, and muxsrv behind a token (AUTH once per connection).
    ServerSpec("muxsrv-tls", (*MUXSRV_ECHO, *TLS_ARGS), tls=True, default=False),
    ServerSpec(
        "muxsrv-auth", (*MUXSRV_ECHO, "--auth-token-file", "{tokens}"), auth=True, default=False
    ),
    ServerSpec(
        "uvloop-protocol-tls",
        _py("asyncio_protocol.py", "--loop", "uvloop", *TLS_ARGS),
        ("uvloop",),
        tls=True,
        default=False,
    ),
    ServerSpec(
        "asyncio-protocol-tls", _py("asyncio_protocol.py", *TLS_ARGS), tls=True, default=False
    ),
)
NAMES = tuple(s.name for s in SERVERS)
DEFAULT_NAMES = tuple(s.name for s in SERVERS if s.default)
#: What --tls runs: the TLS servers, muxsrv with tokens, and the plaintext pair beside them.
TLS_NAMES = ("muxsrv", "muxsrv-auth", "muxsrv-tls", "uvloop-protocol", "uvloop-protocol-tls",
             "asyncio-protocol-tls")  # fmt: skip


def pinned(argv: tuple[str, ...] | list[str], cpu: int | None) -> list[str]:
    """`argv` run on CPU `cpu` only (unchanged if no CPU or no taskset)."""
    if cpu is None or shutil.which("taskset") is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


class RunningServer:
    """A started server process: its address, its stderr tail, its RSS and CPU time."""

    def __init__(
        self, spec: ServerSpec, cpu: int | None, files: tlsfiles.BenchFiles | None = None
    ) -> None:
        if spec.needs_files and files is None:
            raise RuntimeError(f"{spec.name} needs its TLS or token files")
        argv = files.expand(spec.argv) if files is not None else list(spec.argv)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(MALLOC_ENV)
        self.spec = spec
        self.files = files
        self.proc = subprocess.Popen(
            pinned(argv, cpu),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        self.pid = self.proc.pid  # taskset execs the server: same PID
        self.port = 0
        self._tail: collections.deque[str] = collections.deque(maxlen=50)
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._tail.append(line)
            if not self._started.is_set():
                m = LISTEN_RE.search(line)
                if m:
                    self.port = int(m.group(2))
                    self._started.set()
        self._started.set()  # EOF: the process is gone

    def wait_started(self) -> None:
        if not self._started.wait(START_TIMEOUT) or not self.port:
            self.stop()
            raise RuntimeError(f"{self.spec.name} did not start: {self.stderr_tail()}")

    def stderr_tail(self, lines: int = 5) -> str:
        return " | ".join(list(self._tail)[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        """User + system time of the whole process (all its threads) so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if it hangs; always reaped.  Returns the exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def start(
    spec: ServerSpec, cpu: int | None, files: tlsfiles.BenchFiles | None = None
) -> RunningServer:
    server = RunningServer(spec, cpu, files)
    server.wait_started()
    time.sleep(0.2)  # let lazy start-up work finish before anything is measured
    return server
