"""``--workers N``: N single-threaded servers on one port, under a supervisor that reloads them.

The port.  The supervisor creates the listening sockets once, before any
worker, one per address ``--host`` resolves to, with ``SO_REUSEADDR`` (a
leftover TIME_WAIT connection is no conflict) and without ``SO_REUSEPORT``:
so the bind fails with EADDRINUSE if anything listens on or holds the port,
and a second muxsrv, with or without ``--workers``, refuses to start (exit 2)
instead of quietly sharing the traffic.  The sockets outlive every worker:
connections waiting in the accept queue while workers come and go wait for
the next ``accept`` instead of being reset (closing a ``SO_REUSEPORT``
listener resets its queue), as nginx and gunicorn keep theirs.

The workers.  Each is a fresh interpreter, ``python -m muxsrv`` with the
supervisor's own interpreter flags (``-X``, ``-W``, ``-O`` ...) and command
line, so a reload runs the handler code now on disk; it inherits the
listening sockets and the write end of a pipe on which it says that its
loop serves, or why it cannot start (``handover.py``: the variables, and why
only a child of the supervisor adopts them).  Its stdout and stderr are the
supervisor's.  Before it execs, the child asks the kernel for
a SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``, Linux) and checks
that it has not died already, so even a SIGKILLed supervisor leaves no
worker behind.  Workers share the accept queue: whichever is free takes the
next connection.

The supervisor.  SIGINT, SIGTERM, SIGHUP and SIGCHLD stay blocked in it; it
takes them with ``sigtimedwait`` and reaps with ``waitpid(WNOHANG)``, so a
signal at any moment is handled, never lost.  While a worker is still to
report that it serves, it looks at the readiness pipes every ``READY_POLL``
(for ``READY_TIMEOUT`` at most: then the worker is taken as hung).
What to start and stop is decided by :class:`~muxsrv.generations.Generations`
(replacing dead workers with a back-off, SIGHUP reloads, the drain, SIGKILL
for stragglers, giving up when the first generation cannot start); this
module carries it out.  Should the supervisor itself fail (an exception),
its workers still drain: SIGTERM, and SIGKILL only for those still running
after the drain timeout and grace.  It never touches a client connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from . import logs
from . import server as _server
from .address import format_address
from .generations import KILL, SPAWN, TERM, Generations
from .handover import ENV_LISTEN, ENV_READY, ENV_SUPERVISOR, FAILED, READY
from .server import DRAIN_GRACE, HANDLER_CLEANUP_TIMEOUT, CannotListen, Settings
from .workerstats import ENV_ADMIN_FD, ENV_STATS_DIR, ENV_WORKER, mark_dead

__all__ = ["CannotStart", "open_listeners", "supervise"]

log = logging.getLogger("muxsrv.workers")

#: After the drain timeout, how long a worker may take to exit before it is
#: killed: the server's own grace periods, and a second for the process.
STOP_GRACE: Final = DRAIN_GRACE + HANDLER_CLEANUP_TIMEOUT + 1.0
#: The longest the supervisor waits without reaping (a lost SIGCHLD costs no more).
TICK: Final = 1.0
#: While a worker is starting, how often its readiness pipe is looked at.
READY_POLL: Final = 0.02
_STOP_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM})
_RELOAD: Final = signal.SIGHUP
_SIGNALS: Final = _STOP_SIGNALS | {signal.SIGCHLD, _RELOAD}
_PR_SET_PDEATHSIG: Final = 1


def open_listeners(settings: Settings) -> list[socket.socket]:
    """The listening sockets every generation shares (see the module docstring).

    Raises CannotListen: EADDRINUSE if anything else listens on or holds the port.
    """
    try:
        return _server._bind(replace(settings, reuse_port=False))
    except OSError as exc:
        raise CannotListen(settings.host, settings.port, exc) from exc


class CannotStart(Exception):
    """The first generation of workers could not start; ``str()`` says why, in one line."""


def supervise(settings: Settings, count: int, argv: list[str],
              on_listening: Callable[[], None] | None = None, log_file: bool = False,
              admin: tuple[str, int] | None = None) -> int:
    """Run ``count`` workers (``python -m muxsrv *argv``) until a signal; the exit status.

    With ``log_file``, a SIGHUP also reopens the supervisor's ``--log-file`` and is
    forwarded to every worker that serves (old generations too), which reopen theirs.

    Raises CannotListen before any worker starts if the port cannot be had, and
    CannotStart (once every worker has exited) if the first generation fails to start.
    """
    socks = open_listeners(settings)
    admin_sock = stats_dir = None
    try:
        if admin is not None:
            admin_sock = _admin_listener(*admin)
            stats_dir = Path(tempfile.mkdtemp(prefix="muxsrv-stats-"))
        if on_listening is not None:
            on_listening()  # the port is ours: the --pid-file
        supervisor = _Supervisor(settings, count, argv, socks)
        supervisor.log_file = log_file
        if admin_sock is not None and stats_dir is not None:
            supervisor.admin = (admin_sock.fileno(), stats_dir)
            log.info("admin port on %s, every worker's numbers", format_address(
                admin_sock.getsockname()))
        status = supervisor.run()
        if supervisor.gens.failed:
            raise CannotStart(supervisor.gens.failed)
        return status
    finally:
        for sock in socks:
            sock.close()
        if admin_sock is not None:
            admin_sock.close()
        if stats_dir is not None:
            shutil.rmtree(stats_dir, ignore_errors=True)


def _admin_listener(host: str, port: int) -> socket.socket:
    """The admin port every worker shares (``muxsrv.workerstats``)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise CannotListen(host, port, exc) from exc
    return sock


class _Supervisor:
    def __init__(self, settings: Settings, count: int, argv: list[str],
                 socks: list[socket.socket]) -> None:
        flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
        self.command = [sys.executable, *flags, "-m", "muxsrv", *argv]
        self.fds = [sock.fileno() for sock in socks]
        self.gens = Generations(count, settings.drain_timeout, STOP_GRACE)
        self.pid = os.getpid()
        self.prctl = _load_prctl()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.pipes: dict[int, int] = {}  # pid -> the read end of its readiness pipe
        self.said: dict[int, str] = {}  # pid -> why it cannot start, in its own words
        self.old_mask: set[int | signal.Signals] = set()
        self.log_file = False
        #: --admin-port: the shared socket's descriptor and the numbers' directory.
        self.admin: tuple[int, Path] | None = None
        self.numbers: dict[int, int] = {}  # pid -> its number (spawn order)
        self.spawned = 0

    def run(self) -> int:
        gens = self.gens
        self.old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            gens.start()
            while True:
                self.act()
                self.read_ready()
                self.reap()
                now = time.monotonic()
                gens.tick(now)
                self.act()
                if gens.done:
                    break
                deadline = min(now + TICK, gens.deadline())
                if gens.waiting_for_ready():
                    deadline = min(deadline, now + READY_POLL)
                info = signal.sigtimedwait(_SIGNALS, max(0.0, deadline - now))
                if info is not None:
                    self.on_signal(info.si_signo)
        finally:
            self.stop_all()  # none left, unless an exception brought us here
            for _ in range(8):  # let no pending SIGINT raise KeyboardInterrupt later
                if signal.sigtimedwait(_SIGNALS, 0) is None:
                    break
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)
        return gens.status

    def on_signal(self, signum: int) -> None:
        now = time.monotonic()
        if signum in _STOP_SIGNALS:
            self.gens.stop(now, signal.Signals(signum).name)
        elif signum == _RELOAD:
            if self.log_file:
                self.reopen_logs()
            self.gens.reload(now)

    def reopen_logs(self) -> None:
        """SIGHUP with a --log-file: reopen ours, and have each serving worker reopen its own
        (only those that serve: before its loop's handler, SIGHUP would end a worker)."""
        log.info("SIGHUP: %s", logs.reopen())
        for pid, worker in self.gens.workers.items():
            if worker.ready and pid in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, _RELOAD)

    def act(self) -> None:
        """Carry out what the generations decided (a spawn may decide more)."""
        while actions := self.gens.take():
            for action, arg in actions:
                if action == SPAWN:
                    if not self.gens.stopping and not self.stop_pending():
                        self.spawn(arg)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(arg, signal.SIGTERM if action == TERM else signal.SIGKILL)
                    if action == KILL:
                        log.debug("SIGKILL sent to worker %d", arg)

    def stop_pending(self) -> bool:
        """Take a SIGINT or SIGTERM that came during the spawns: no more of them."""
        if not _STOP_SIGNALS & signal.sigpending():
            return False
        info = signal.sigtimedwait(_STOP_SIGNALS, 0)
        if info is not None:
            self.on_signal(info.si_signo)
        return True

    # -- workers come ... ------------------------------------------------------

    def spawn(self, generation: int) -> None:
        ready_r = ready_w = -1
        try:
            ready_r, ready_w = os.pipe()
            os.set_blocking(ready_r, False)
            env = {**os.environ, ENV_LISTEN: ",".join(map(str, self.fds)),
                   ENV_READY: str(ready_w), ENV_SUPERVISOR: str(self.pid)}
            fds = (*self.fds, ready_w)
            if self.admin is not None:
                env.update({ENV_ADMIN_FD: str(self.admin[0]), ENV_STATS_DIR: str(self.admin[1]),
                            ENV_WORKER: str(self.spawned)})
                fds = (*fds, self.admin[0])
            proc = subprocess.Popen(self.command, env=env, pass_fds=fds,
                                    preexec_fn=self.in_child)
        except (OSError, subprocess.SubprocessError) as exc:
            _close(ready_r)
            self.gens.spawn_failed(generation, time.monotonic(), str(exc))
            return
        except BaseException:
            _close(ready_r)
            raise
        finally:
            _close(ready_w)
        self.procs[proc.pid] = proc
        self.pipes[proc.pid] = ready_r
        self.numbers[proc.pid] = self.spawned
        self.spawned += 1
        self.gens.spawned(proc.pid, generation, time.monotonic())

    def in_child(self) -> None:
        """In the child, between fork and exec."""
        if self.prctl is not None:
            self.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self.pid:  # the supervisor died before prctl
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)

    def read_ready(self) -> None:
        for pid in list(self.pipes):
            self.read_pipe(pid)

    def read_pipe(self, pid: int) -> None:
        """The worker's one word, if it has said it: it serves, or why it cannot start."""
        fd = self.pipes[pid]
        try:
            data = os.read(fd, 8192)
        except BlockingIOError:
            return
        os.close(fd)
        del self.pipes[pid]
        if data.startswith(FAILED):
            self.said[pid] = data[len(FAILED):].decode("utf-8", "replace").strip()
        elif data.startswith(READY):
            self.gens.ready(pid, time.monotonic())

    # -- ... and go --------------------------------------------------------------

    def reap(self) -> None:
        while self.procs and (reaped := _reap_one()) is not None:
            self.forget(*reaped)

    def forget(self, pid: int, code: int) -> None:
        proc = self.procs.pop(pid, None)
        if proc is None:
            return
        proc.returncode = code  # reaped here: Popen must never wait for this PID again
        number = self.numbers.pop(pid, None)
        if self.admin is not None and number is not None:
            mark_dead(self.admin[1], number, pid)
        if pid in self.pipes:  # what it wrote just before it exited
            self.read_pipe(pid)
        fd = self.pipes.pop(pid, None)
        if fd is not None:
            os.close(fd)
        self.gens.exited(pid, code, time.monotonic(), self.said.pop(pid, ""))

    def stop_all(self) -> None:
        """After an exception (else no worker is left): every worker drains, as on SIGTERM;
        those still running after the drain timeout and grace, or at a stop signal, are
        killed.  Nothing is asked of the generations, whose state may be what failed."""
        for fd in self.pipes.values():
            os.close(fd)
        self.pipes.clear()
        if not self.procs:
            return
        log.error("the supervisor failed; stopping its %d workers", len(self.procs))
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.gens.stop_after
        while self.procs:
            while self.procs and (reaped := _reap_one()) is not None:
                if (proc := self.procs.pop(reaped[0], None)) is not None:
                    proc.returncode = reaped[1]
            left = deadline - time.monotonic()
            if not self.procs:
                break
            info = signal.sigtimedwait(_SIGNALS, min(TICK, left)) if left > 0 else None
            if left <= 0 or (info is not None and info.si_signo in _STOP_SIGNALS):
                self.signal_all(signal.SIGKILL)
                for pid, proc in self.procs.items():
                    with contextlib.suppress(ChildProcessError):
                        proc.returncode = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                self.procs.clear()

    def signal_all(self, signum: int) -> None:
        for pid in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def _reap_one() -> tuple[int, int] | None:
    """(pid, exit code) of a child that has exited, if any."""
    try:
        pid, wait_status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return None
    return (pid, os.waitstatus_to_exitcode(wait_status)) if pid else None


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _load_prctl() -> Any:
    """libc's prctl on Linux, else None (no PR_SET_PDEATHSIG: workers outlive a killed parent)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
