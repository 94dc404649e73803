"""``--workers N``: N single-threaded servers sharing one port, under a small parent.

Each worker is a forked copy of the configured server that binds its own
listening socket with ``SO_REUSEPORT``, so the kernel spreads new connections
over the workers (Linux hashes each connection to one listener; no shared
accept queue, no thundering herd).  With ``--port 0`` the parent first binds a
non-listening ``SO_REUSEPORT`` socket to learn a free port, and keeps it so the
port stays reserved for workers that restart.

The parent only supervises: it restarts a worker that dies (with a back-off
if workers die right after starting, so a crash loop cannot spin), forwards
SIGINT/SIGTERM so every worker drains gracefully, and exits 0 once all have
stopped.  It never touches a client connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Final

from .server import Settings

__all__ = ["supervise"]

log = logging.getLogger("muxsrv")

#: A worker that dies sooner than this after starting counts as a crash ...
QUICK_DEATH: Final = 1.0
#: ... and its restart waits this long (doubling, up to MAX_BACKOFF).
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 5.0


def reserve_port(settings: Settings) -> socket.socket | None:
    """For --port 0, bind (without listening) to learn a port every worker can share."""
    if settings.port != 0:
        return None
    info = socket.getaddrinfo(
        settings.host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(info[0], info[1], info[2])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(info[4])
    return sock


def supervise(settings: Settings, count: int, run_worker: Callable[[Settings], int]) -> int:
    """Run ``count`` workers (``run_worker(settings)`` in forked children) until a signal."""
    reserved = reserve_port(settings)
    if reserved is not None:
        settings = replace(settings, port=reserved.getsockname()[1])
    settings = replace(settings, reuse_port=True)
    stopping = False
    workers: dict[int, float] = {}  # pid -> start time
    backoff = FIRST_BACKOFF

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                if reserved is not None:
                    reserved.close()
                status = run_worker(settings)
            except BaseException:
                log.exception("worker failed")
            finally:
                sys.stderr.flush()
                os._exit(status)
        workers[pid] = time.monotonic()

    old_handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for _ in range(count):
            spawn()
        while workers:
            pid, status = os.wait()
            started = workers.pop(pid, None)
            if started is None or stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            log.warning("worker %d exited with status %d; starting another", pid, code)
            if time.monotonic() - started < QUICK_DEATH:
                _sleep_unless(lambda: stopping, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            else:
                backoff = FIRST_BACKOFF
            if not stopping:
                spawn()
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        if reserved is not None:
            reserved.close()
    return 0


def _sleep_unless(stop: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
