"""``--workers N``: N single-threaded servers sharing one port, under a small parent.

The port.  Before it forks, the parent reserves the port with one socket per
address ``--host`` resolves to, bound and never listening.  It binds with
``SO_REUSEADDR`` (leftover TIME_WAIT connections are no conflict) and without
``SO_REUSEPORT``, so the bind fails with EADDRINUSE if anything listens on or
holds the port: a second muxsrv, with or without ``--workers``, refuses to
start (exit 2) instead of quietly sharing the traffic.  Then the socket is
switched to ``SO_REUSEPORT`` without ``SO_REUSEADDR``: our workers'
``SO_REUSEPORT`` listeners can join it, and the next instance's bind still
fails, even at a moment when no worker is listening (checked on Linux 6.18).
With ``--port 0`` this bind picks the port every worker uses.

The workers.  Each is a forked copy of the configured server that binds its
own listening socket with ``SO_REUSEPORT``, so the kernel spreads new
connections over the workers (no shared accept queue, no thundering herd).
Each asks the kernel for a SIGTERM when the parent dies (``PR_SET_PDEATHSIG``,
Linux), so even a SIGKILLed parent leaves no worker behind.

The parent.  SIGINT, SIGTERM and SIGCHLD stay blocked in it; it takes them
with ``sigtimedwait`` and reaps with ``waitpid(WNOHANG)``, so a signal at any
moment (between ``fork()`` and recording the PID too) is handled, never lost.
A worker that dies is replaced; one that dies young is replaced after a
back-off (``Backoff``), and such a crash loop is logged once.  A worker that
cannot listen stops everything: one line naming the address, exit 1.  The
first signal drains every worker, exit 0 once all have stopped; a second, or
workers still running well past the drain timeout, SIGKILLs them, exit 1.
The parent never touches a client connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from .server import DRAIN_GRACE, HANDLER_CLEANUP_TIMEOUT, CannotListen, Settings, bind_sockets

__all__ = ["Backoff", "reserve", "supervise"]

log = logging.getLogger("muxsrv")

#: A worker that died younger than HEALTHY_AFTER is restarted after FIRST_BACKOFF,
#: doubling with each such death up to MAX_BACKOFF ...
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 5.0
#: ... until a worker has lived this long.
HEALTHY_AFTER: Final = 10.0
#: The exit status of a worker that could not listen (EX_OSERR); the reason
#: comes through the report pipe.
EXIT_CANNOT_LISTEN: Final = 71
#: After the drain timeout, how long the workers may take to exit before they
#: are killed: the server's own grace periods, and a second for the process.
STOP_GRACE: Final = DRAIN_GRACE + HANDLER_CLEANUP_TIMEOUT + 1.0
#: The longest the parent waits without reaping (a lost SIGCHLD costs no more).
TICK: Final = 1.0
_STOP_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM})
#: Forwarded to every worker (it re-reads --auth-token-file; ignored without one).
_RELOAD: Final = signal.SIGHUP
_SIGNALS: Final = _STOP_SIGNALS | {signal.SIGCHLD, _RELOAD}
_PR_SET_PDEATHSIG: Final = 1
_CLEAN_EXITS: Final = frozenset({0, -signal.SIGTERM, -signal.SIGINT})


class Backoff:
    """How long to wait before replacing a worker that died (sans-IO: the caller's clock).

    A worker that lived ``HEALTHY_AFTER`` is replaced at once.  One that died
    younger starts a crash loop, or continues it: ``FIRST_BACKOFF`` doubling to
    ``MAX_BACKOFF``.  The loop is over once a worker has lived ``HEALTHY_AFTER``,
    or once that long has passed since the last young death's replacement.
    """

    def __init__(self) -> None:
        self.delay = 0.0  # the last back-off given; 0 outside a crash loop
        self._replaced = -math.inf  # when the last young death's replacement was due

    def died(self, now: float, lived: float) -> tuple[float, bool]:
        """(seconds to wait before the replacement, whether a crash loop starts)."""
        if lived >= HEALTHY_AFTER or now - self._replaced >= HEALTHY_AFTER:
            self.delay = 0.0
        if lived >= HEALTHY_AFTER:
            return 0.0, False
        starts = self.delay == 0.0
        self.delay = FIRST_BACKOFF if starts else min(self.delay * 2, MAX_BACKOFF)
        self._replaced = now + self.delay
        return self.delay, starts


def reserve(settings: Settings) -> list[socket.socket]:
    """Hold the port on every address for our workers alone (see the module docstring).

    Raises CannotListen: EADDRINUSE if anything else listens on or holds the port.
    """
    try:
        return bind_sockets(settings.host, settings.port, False, _for_our_workers)
    except OSError as exc:
        raise CannotListen(settings.host, settings.port, exc) from exc


def _for_our_workers(sock: socket.socket) -> None:
    """Bound without SO_REUSEPORT (so nobody else held the port): now let workers join."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)


def supervise(settings: Settings, count: int, run_worker: Callable[[Settings], int],
              on_reserved: Callable[[], None] | None = None) -> int:
    """Run ``count`` workers (``run_worker(settings)`` in forked children) until a signal.

    Returns the exit status (module docstring); raises CannotListen before any
    worker starts if the port cannot be reserved.
    """
    held = reserve(settings)
    settings = replace(settings, port=held[0].getsockname()[1], reuse_port=True)
    try:
        if on_reserved is not None:
            on_reserved()  # the port is ours: the --pid-file
        return _Supervisor(settings, count, run_worker, held).run()
    finally:
        for sock in held:
            sock.close()


class _Supervisor:
    def __init__(
        self,
        settings: Settings,
        count: int,
        run_worker: Callable[[Settings], int],
        held: list[socket.socket],
    ) -> None:
        self.settings = settings
        self.run_worker = run_worker
        self.held = held
        self.pid = os.getpid()
        self.prctl = _load_prctl()
        self.workers: dict[int, float] = {}  # pid -> when it started
        self.due: list[float] = [0.0] * count  # when each missing worker may start
        self.backoff = Backoff()
        self.stopping = False
        self.killed = False  # by kill_all: a SIGKILL while stopping is no news
        self.kill_at = math.inf
        self.status = 0
        self.failure = ""  # why a worker could not listen
        self.old_mask: set[int | signal.Signals] = set()
        self.report_r, self.report_w = os.pipe()
        os.set_blocking(self.report_r, False)

    def run(self) -> int:
        self.old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            while True:
                self.reap()
                if self.stopping and not self.workers:
                    break
                now = time.monotonic()
                if not self.stopping:
                    self.start_due(now)
                elif now >= self.kill_at:
                    log.warning("%d workers still running %g s after the drain timeout; "
                                "killing them", len(self.workers), STOP_GRACE)
                    self.kill_all()
                deadline = min([now + TICK, self.kill_at, *self.due])
                info = signal.sigtimedwait(_SIGNALS, max(0.0, deadline - now))
                if info is not None and info.si_signo in _STOP_SIGNALS:
                    self.on_signal(info.si_signo)
                elif info is not None and info.si_signo == _RELOAD and not self.stopping:
                    log.info("SIGHUP: passing it on to %d workers", len(self.workers))
                    self._signal_all(_RELOAD)
        finally:
            self.kill_all()  # none left, unless an exception brought us here
            for pid in list(self.workers):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            for _ in range(8):  # let no pending SIGINT raise KeyboardInterrupt later
                if signal.sigtimedwait(_SIGNALS, 0) is None:
                    break
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)
            os.close(self.report_r)
            os.close(self.report_w)
        if self.failure:
            sys.stderr.write(f"muxsrv: error: {self.failure}\n")
        return self.status

    # -- workers come ... ------------------------------------------------------

    def start_due(self, now: float) -> None:
        self.due.sort()
        while self.due and self.due[0] <= now:
            if _STOP_SIGNALS & signal.sigpending():
                return  # no more forks: the signal is taken next
            self.due.pop(0)
            pid = os.fork()
            if pid == 0:
                self.be_worker()
            self.workers[pid] = time.monotonic()

    def be_worker(self) -> None:
        """In the child, right after fork: never returns."""
        status = 1
        try:
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            # Until the worker's loop takes it (with --auth-token-file), a forwarded
            # SIGHUP must not kill it.
            signal.signal(_RELOAD, signal.SIG_IGN)
            if self.prctl is not None:
                self.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != self.pid:  # the parent died before prctl
                os._exit(1)
            for sock in self.held:
                sock.close()
            os.close(self.report_r)
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)
            status = self.run_worker(self.settings)
        except CannotListen as exc:
            os.write(self.report_w, f"{exc} (worker pid {os.getpid()})\n".encode())
            status = EXIT_CANNOT_LISTEN
        except BaseException:
            log.exception("worker failed")
        finally:
            sys.stderr.flush()
            os._exit(status)

    # -- ... and go --------------------------------------------------------------

    def reap(self) -> None:
        while self.workers:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            started = self.workers.pop(pid, None)
            if started is not None:
                lived = time.monotonic() - started
                self.exited(pid, os.waitstatus_to_exitcode(wait_status), lived)

    def exited(self, pid: int, code: int, lived: float) -> None:
        if code == EXIT_CANNOT_LISTEN:
            if not self.failure:
                report = ""
                with contextlib.suppress(BlockingIOError):
                    report = os.read(self.report_r, 65536).decode("utf-8", "replace")
                self.failure = report.partition("\n")[0] or f"worker {pid} cannot listen"
                self.status = 1
                self.stop()
            return
        if self.stopping:
            if code not in _CLEAN_EXITS and not (self.killed and code == -signal.SIGKILL):
                log.warning("worker %d %s while stopping", pid, _how(code))
                self.status = 1
            return
        now = time.monotonic()
        delay, starts = self.backoff.died(now, lived)
        if delay == 0:
            log.warning("worker %d %s after %.0f s; starting another", pid, _how(code), lived)
        elif starts:
            log.warning(
                "worker %d %s %.1f s after starting; restarting workers after a back-off "
                "(%g s doubling to %g s) until one has lived %g s",
                pid, _how(code), lived, FIRST_BACKOFF, MAX_BACKOFF, HEALTHY_AFTER,
            )
        else:
            log.debug("worker %d %s; restarting in %g s", pid, _how(code), delay)
        self.due.append(now + delay)

    def on_signal(self, signum: int) -> None:
        if not self.stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self.workers))
            self.stop()
        else:
            log.warning("second signal: killing the %d workers still running", len(self.workers))
            self.kill_all()

    def stop(self) -> None:
        self.stopping = True
        self.due.clear()
        self.kill_at = time.monotonic() + self.settings.drain_timeout + STOP_GRACE
        self._signal_all(signal.SIGTERM)

    def kill_all(self) -> None:
        if self.workers:
            self.status = 1
            self.killed = True
            self._signal_all(signal.SIGKILL)
        self.kill_at = math.inf

    def _signal_all(self, signum: int) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def _how(code: int) -> str:
    """How a worker ended, from ``waitstatus_to_exitcode``."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _load_prctl() -> Any:
    """libc's prctl on Linux, else None (no PR_SET_PDEATHSIG: workers outlive a killed parent)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
