"""The exec handler: each message is a command line; the reply is its result.

How it works
------------
``configure`` checks the options (``exec_config``) and returns an
:class:`ExecService`: the factory the server calls per connection, and the
one place for state shared by all of them, the :class:`Slots` that bound how
many commands run at once (``--exec-max-procs``).

Each connection gets an :class:`ExecHandler` with a queue of received
commands.  It runs them one after another, so replies leave in request order;
the head of the queue waits for a slot (first come, first served across
connections, and a connection goes to the back of the line after each
command, so one long pipeline cannot hold a slot), then runs as a
:class:`~.exec_process.Child` watched by the server's own loop.  Nothing here
ever waits: a child's pipes and exit are events like a socket's.

Back-pressure, both ways.  While the connection's output is above the
high-water mark (``pause_writing``) no new command starts: the queue waits
for ``resume_writing``.  A command that was already running finishes (its
output is bounded by ``--exec-max-output``).  And the queue itself is bounded,
by count and by bytes: past ``PAUSE_AT`` commands or ``PAUSE_BYTES`` of
command lines, reading pauses.  So a client that pipelines without reading
costs the server about one command's output, the high-water mark and the
queue's bytes, however long its pipeline.

Every received command is "work in progress" for the connection until its
reply is queued, so idle timeouts spare it and the shutdown drain waits for
it; after the drain, ``connection_lost`` kills what still runs.  A client
that goes away (``connection_lost``) has its running command's process group
killed and its queued commands dropped; a half-closed one is still answered.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
from collections import deque
from typing import TYPE_CHECKING, Final

from ..address import format_address
from ..handler import Conn, Handler
from ..stats import EXEC
from . import exec_config
from .exec_config import ExecConfig
from .exec_process import Child
from .exec_protocol import (
    CANNOT_EXECUTE,
    NOT_FOUND,
    ExecResult,
    Refused,
    command_argv,
    encode_header,
    encode_reply,
)

if TYPE_CHECKING:
    from ..loop import EventLoop

__all__ = ["ExecHandler", "ExecService", "Slots"]

log = logging.getLogger("muxsrv.exec")

#: Stop reading from a connection with this many commands pending (bounds its queue) ...
PAUSE_AT: Final = 32
#: ... and read again once it is down to this many.
RESUME_AT: Final = 8
#: Likewise by bytes: command lines may be up to --max-frame each, and a queue of
#: them waiting behind unread output must not cost more than that output may.
PAUSE_BYTES: Final = 64 * 1024
RESUME_BYTES: Final = 16 * 1024
#: How much of a command line a log line shows.
LOG_COMMAND_MAX: Final = 200


class Slots:
    """At most ``size`` commands run at once; the others wait, first come first served."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.running = 0
        self._waiting: deque[ExecHandler] = deque()
        self._granting = False

    def request(self, handler: ExecHandler) -> None:
        """``handler.slot_granted()`` is called now, or when a slot frees up."""
        self._waiting.append(handler)
        EXEC.queued += 1
        self._grant()

    def cancel(self, handler: ExecHandler) -> None:
        if handler in self._waiting:
            self._waiting.remove(handler)
            EXEC.queued -= 1

    def release(self) -> None:
        self.running -= 1
        self._grant()

    def _grant(self) -> None:
        # slot_granted may release or request again: the outer loop carries on
        # instead of recursing (a thousand failing spawns must not nest).
        if self._granting:
            return
        self._granting = True
        try:
            while self._waiting and self.running < self.size:
                self.running += 1
                EXEC.queued -= 1
                self._waiting.popleft().slot_granted()
        finally:
            self._granting = False


class ExecService:
    """What ``configure`` returns: the factory, holding what connections share."""

    def __init__(self, config: ExecConfig) -> None:
        self.config = config
        self.slots = Slots(config.max_procs)

    def __call__(self) -> ExecHandler:
        return ExecHandler(self)


class ExecHandler(Handler):
    """One connection's commands: queued, run one at a time, answered in order."""

    udp_unsafe = "a forged source address would run commands for someone else"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        exec_config.add_arguments(parser)

    @classmethod
    def configure(cls, options: argparse.Namespace) -> ExecService:
        return ExecService(exec_config.from_options(options))

    def __init__(self, service: ExecService) -> None:
        self._service = service
        self._config = service.config
        self._conn: Conn | None = None
        self._peer = "unknown peer"
        self._queue: deque[bytes] = deque()  # received, not answered; the head runs
        self._queued_bytes = 0  # their sizes, together
        self._argv: list[bytes] | list[str] = []  # the head's, while it waits for a slot
        self._waiting = False
        self._child: Child | None = None
        self._paused = False  # reading, by us: the queue is full
        self._writing_paused = False  # by the connection: its output is above high water
        self._lost = False

    # -- the handler interface ---------------------------------------------------

    def connection_made(self, conn: Conn) -> None:
        self._conn = conn
        self._peer = format_address(conn.peer)  # now: a closed socket cannot tell

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self._queue.append(payload)
        self._queued_bytes += len(payload)
        conn.work_started()
        if not self._paused and (len(self._queue) >= PAUSE_AT
                                 or self._queued_bytes >= PAUSE_BYTES):
            self._paused = True
            conn.pause_reading()
        self._next()

    def pause_writing(self, conn: Conn) -> None:
        self._writing_paused = True  # _next starts nothing until resume_writing

    def resume_writing(self, conn: Conn) -> None:
        self._writing_paused = False
        # From the loop, not from inside the connection's own output bookkeeping
        # (which is where this is called from): _next may send a reply at once.
        conn.loop.call_soon(self._next)

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        self._lost = True
        dropped = len(self._queue) - (self._child is not None)
        self._queue.clear()
        self._queued_bytes = 0
        if self._waiting:
            self._waiting = False
            self._service.slots.cancel(self)
        if dropped:
            log.info("exec %s: connection lost; %d queued commands dropped", self._peer, dropped,
                     extra={"peer": self._peer, "dropped": dropped})
        if self._child is not None:
            self._child.abandon()  # _child_done follows once it is reaped

    # -- running the queue -----------------------------------------------------

    def _next(self) -> None:
        """Start on the head of the queue unless a command is running or waiting.

        Nothing starts while writing is paused: resume_writing calls this again.
        """
        while (self._queue and self._child is None and not self._waiting
               and not self._writing_paused and not self._lost):
            try:
                self._argv = command_argv(self._queue[0], self._config.allowed)
            except Refused as exc:
                log.info("exec %s: refused (%s): %s", self._peer, exc, _shown(self._queue[0]),
                         extra={"peer": self._peer, "outcome": "refused"})
                EXEC.finished["refused"] += 1
                self._answer(encode_reply(ExecResult(
                    NOT_FOUND, stderr=f"muxsrv: {exc}; nothing was run\n".encode()
                )))
                continue
            self._waiting = True
            self._service.slots.request(self)  # slot_granted: now or later

    def slot_granted(self) -> None:
        self._waiting = False
        if self._writing_paused:  # paused while in line: give the slot back, wait
            self._service.slots.release()
            return
        config = self._config
        command = self._queue[0]
        try:
            child = Child(
                self._loop, self._argv, cwd=config.cwd, env=config.env,
                timeout=config.timeout, max_output=config.max_output, on_done=self._child_done,
            )
        except Exception as exc:  # whatever it was, the slot and the queue go on
            self._service.slots.release()
            self._spawn_failed(command, exc)
            self._next()
            return
        self._child = child
        EXEC.started += 1
        EXEC.running += 1
        if log.isEnabledFor(logging.INFO):
            log.info("exec %s: pid %d started: %s", self._peer, child.pid, _shown(command),
                     extra={"peer": self._peer, "pid": child.pid})

    def _child_done(self, child: Child) -> None:
        self._child = None
        took = self._loop.time() - child.started
        EXEC.running -= 1
        code = child.returncode
        EXEC.finished["timeout" if child.timed_out else "truncated" if child.truncated
                      else "signal" if child.abandoned or code is None or code < 0
                      else "exit_0" if code == 0 else "nonzero"] += 1
        if child.abandoned:
            log.info("exec %s: pid %d killed, client gone after %.3f s",
                     self._peer, child.pid, took,
                     extra={"peer": self._peer, "pid": child.pid, "seconds": round(took, 6),
                            "outcome": "abandoned"})
        else:
            out, err = child.output
            assert child.returncode is not None
            flags = "".join((", timed out" if child.timed_out else "",
                             ", output truncated" if child.truncated else ""))
            if log.isEnabledFor(logging.INFO):
                log.info("exec %s: pid %d exit %d in %.3f s (%d+%d bytes out%s)", self._peer,
                         child.pid, child.returncode, took, out.size, err.size, flags,
                         extra={"peer": self._peer, "pid": child.pid, "exit": child.returncode,
                                "seconds": round(took, 6), "stdout_bytes": out.size,
                                "stderr_bytes": err.size, "timed_out": child.timed_out,
                                "truncated": child.truncated})
            header = encode_header(child.returncode, out.size, err.size,
                                   child.timed_out, child.truncated)
            self._answer(header, *out.parts(), *err.parts())
        self._service.slots.release()
        self._next()

    def _spawn_failed(self, command: bytes, exc: Exception) -> None:
        EXEC.finished["refused"] += 1  # (could not start: nothing ran)
        log.warning("exec %s: cannot start %s: %s", self._peer, _shown(command), exc,
                    exc_info=not isinstance(exc, OSError), extra={"peer": self._peer})
        errno_ = exc.errno if isinstance(exc, OSError) else None
        if errno_ in (errno.ENOENT, errno.ENOTDIR):
            status = NOT_FOUND
        elif errno_ in (errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.EISDIR):
            status = CANNOT_EXECUTE
        else:  # out of processes, descriptors or memory: the server's trouble
            assert self._conn is not None
            self._pop()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self._conn.send_error(f"cannot start the command: {reason}")
            self._done_one()
            return
        assert isinstance(exc, OSError)
        program = os.fsdecode(self._argv[0])
        self._answer(encode_reply(ExecResult(
            status, stderr=f"muxsrv: {program}: {exc.strerror}\n".encode(errors="replace")
        )))

    def _answer(self, payload: bytes, *more: bytes | bytearray | memoryview) -> None:
        """Send the reply to the head of the queue and move on."""
        conn = self._conn
        assert conn is not None
        self._pop()
        if not conn.closing:
            conn.send(payload, *more)
        self._done_one()

    def _pop(self) -> None:
        self._queued_bytes -= len(self._queue.popleft())

    def _done_one(self) -> None:
        assert self._conn is not None
        if self._paused and len(self._queue) <= RESUME_AT and self._queued_bytes <= RESUME_BYTES:
            self._paused = False
            self._conn.resume_reading()
        self._conn.work_done()  # last: with nothing owed after EOF, this closes

    @property
    def _loop(self) -> EventLoop:
        assert self._conn is not None
        return self._conn.loop


def _shown(command: bytes) -> str:
    """A command line for a log line: one line, bounded, undecodable bytes escaped."""
    text = command.decode("utf-8", "backslashreplace")
    if len(text) > LOG_COMMAND_MAX:
        text = text[:LOG_COMMAND_MAX] + "..."
    return repr(text)
