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
supervisor's own command line, so a reload runs the handler code now on
disk; it inherits the listening sockets (their descriptors named in
``MUXSRV_LISTEN_FDS``) and the write end of a pipe (``MUXSRV_READY_FD``) to
which it writes one byte once its loop serves.  The worker takes both out of
its environment at once, so nothing it starts sees them.  Its stdout and
stderr are the supervisor's.  Before it execs, the child asks the kernel for
a SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``, Linux) and checks
that it has not died already, so even a SIGKILLed supervisor leaves no
worker behind.  Workers share the accept queue: whichever is free takes the
next connection.

The supervisor.  SIGINT, SIGTERM, SIGHUP and SIGCHLD stay blocked in it; it
takes them with ``sigtimedwait`` and reaps with ``waitpid(WNOHANG)``, so a
signal at any moment is handled, never lost.  While a worker is still to
report that it serves, it looks at the readiness pipes every ``READY_POLL``.
What to start and stop is decided by :class:`~muxsrv.generations.Generations`
(replacing dead workers with a back-off, SIGHUP reloads, the drain, SIGKILL
for stragglers); this module carries it out.  It never touches a client
connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from . import server as _server
from .generations import KILL, SPAWN, TERM, Generations
from .server import DRAIN_GRACE, HANDLER_CLEANUP_TIMEOUT, CannotListen, Settings

__all__ = ["ENV_LISTEN", "ENV_READY", "inherited", "open_listeners", "supervise"]

log = logging.getLogger("muxsrv")

#: The environment variables that hand a worker its listening sockets and readiness pipe.
ENV_LISTEN: Final = "MUXSRV_LISTEN_FDS"
ENV_READY: Final = "MUXSRV_READY_FD"
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


def inherited() -> tuple[list[socket.socket], int] | None:
    """In a worker: the listening sockets and the readiness pipe; None outside a worker.

    Takes both variables out of the environment.  Raises ValueError if they do
    not name listening sockets.
    """
    listen = os.environ.pop(ENV_LISTEN, None)
    ready = os.environ.pop(ENV_READY, None)
    if listen is None:
        return None
    socks: list[socket.socket] = []
    try:
        for fd in (int(text) for text in listen.split(",")):
            sock = socket.socket(fileno=fd)
            socks.append(sock)
            sock.set_inheritable(False)
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ValueError(f"descriptor {fd} is not listening")
        ready_fd = int(ready) if ready else -1
        if ready_fd >= 0:
            os.set_inheritable(ready_fd, False)
    except (ValueError, OSError) as exc:
        for sock in socks:
            sock.detach()
        raise ValueError(f"{ENV_LISTEN}={listen!r}, {ENV_READY}={ready!r}: {exc}") from None
    return socks, ready_fd


def supervise(settings: Settings, count: int, argv: list[str],
              on_listening: Callable[[], None] | None = None) -> int:
    """Run ``count`` workers (``python -m muxsrv *argv``) until a signal; the exit status.

    Raises CannotListen before any worker starts if the port cannot be had.
    """
    socks = open_listeners(settings)
    try:
        if on_listening is not None:
            on_listening()  # the port is ours: the --pid-file
        return _Supervisor(settings, count, argv, socks).run()
    finally:
        for sock in socks:
            sock.close()


class _Supervisor:
    def __init__(self, settings: Settings, count: int, argv: list[str],
                 socks: list[socket.socket]) -> None:
        self.command = [sys.executable, "-m", "muxsrv", *argv]
        self.fds = [sock.fileno() for sock in socks]
        self.gens = Generations(count, settings.drain_timeout, STOP_GRACE)
        self.pid = os.getpid()
        self.prctl = _load_prctl()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.pipes: dict[int, int] = {}  # pid -> the read end of its readiness pipe
        self.old_mask: set[int | signal.Signals] = set()

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
            self.kill_all()  # none left, unless an exception brought us here
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
            self.gens.reload(now)

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
        ready_r, ready_w = os.pipe()
        env = {**os.environ, ENV_LISTEN: ",".join(map(str, self.fds)), ENV_READY: str(ready_w)}
        try:
            proc = subprocess.Popen(self.command, env=env, pass_fds=(*self.fds, ready_w),
                                    preexec_fn=self.in_child)
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(ready_r)
            self.gens.spawn_failed(generation, time.monotonic(), str(exc))
            return
        finally:
            os.close(ready_w)
        os.set_blocking(ready_r, False)
        self.procs[proc.pid] = proc
        self.pipes[proc.pid] = ready_r
        self.gens.spawned(proc.pid, generation, time.monotonic())

    def in_child(self) -> None:
        """In the child, between fork and exec."""
        if self.prctl is not None:
            self.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self.pid:  # the supervisor died before prctl
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)

    def read_ready(self) -> None:
        for pid, fd in list(self.pipes.items()):
            try:
                byte = os.read(fd, 1)
            except BlockingIOError:
                continue
            os.close(fd)
            del self.pipes[pid]
            if byte:
                self.gens.ready(pid, time.monotonic())

    # -- ... and go --------------------------------------------------------------

    def reap(self) -> None:
        while self.procs:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.forget(pid, os.waitstatus_to_exitcode(wait_status))

    def forget(self, pid: int, code: int) -> None:
        proc = self.procs.pop(pid, None)
        if proc is None:
            return
        proc.returncode = code  # reaped here: Popen must never wait for this PID again
        fd = self.pipes.pop(pid, None)
        if fd is not None:
            os.close(fd)
        self.gens.exited(pid, code, time.monotonic())

    def kill_all(self) -> None:
        for pid in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                _, wait_status = os.waitpid(pid, 0)
                self.forget(pid, os.waitstatus_to_exitcode(wait_status))
        for fd in self.pipes.values():
            os.close(fd)
        self.pipes.clear()


def _load_prctl() -> Any:
    """libc's prctl on Linux, else None (no PR_SET_PDEATHSIG: workers outlive a killed parent)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
