"""One command's process group, run without ever waiting on it.

How it works
------------
``Popen`` starts the command in a session of its own (so its process group
ID is its PID) with stdin on ``/dev/null`` and stdout and stderr on two pipes.
The pipes are made non-blocking and registered with the server's loop; every
readiness event reads once, into the stream's :class:`OutputBuffer`, so both
pipes drain as data arrives and a child writing megabytes to both never
blocks on a full pipe.  The child's exit is learnt from a pidfd registered
with the loop (no polling, no SIGCHLD); without pidfds, from a short timer.

The command is finished when its leader has exited and both pipes are at EOF,
or, after it was killed (timeout, output cap, client gone), as soon as the
leader has exited.  Then the whole group gets SIGKILL, so nothing a command
started outlives its reply, and only then is the leader reaped: while the
leader is an unreaped zombie its PID, which is the group's ID, cannot be
reused, so signalling the group can never hit a stranger.

What this cannot do: a descendant that leaves the process group (``setsid``,
``setpgid``) escapes the kill.  Contain those with the service manager
(systemd ``KillMode=control-group``, ``TasksMax=``) or a container.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import IO, TYPE_CHECKING, Final

from .exec_protocol import OutputBuffer

if TYPE_CHECKING:
    from ..loop import EventLoop, Timer

__all__ = ["Child"]

log = logging.getLogger("muxsrv.exec")

#: Without pidfds: how often to look whether the leader has exited.
EXIT_POLL_INTERVAL: Final = 0.02
_STREAMS: Final = ("stdout", "stderr")


class Child:
    """A running command; ``on_done(child)`` is called once, after it was reaped.

    Then ``returncode``, ``output`` (stdout and stderr buffers), ``timed_out``
    and ``truncated`` say what happened.  ``abandon()`` kills it and drops its
    output (the client went away); ``on_done`` still follows the reaping.
    """

    def __init__(
        self,
        loop: EventLoop,
        argv: Sequence[str] | Sequence[bytes],
        *,
        cwd: str,
        env: Mapping[str, str],
        timeout: float,
        max_output: int,
        on_done: Callable[[Child], object],
    ) -> None:
        """Start the command; raises ``OSError`` if it cannot be started."""
        self._loop = loop
        self._on_done = on_done
        self.max_output = max_output
        self.output = (OutputBuffer(), OutputBuffer())
        self.returncode: int | None = None
        self.timed_out = False
        self.truncated = False
        self.abandoned = False
        self.killed = False
        self.started = loop.time()
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=cwd, env=env, close_fds=True, start_new_session=True,
        )
        self.pid = self._proc.pid
        self._exited = False  # the leader has exited (it stays a zombie until reaped)
        self._pipes: list[IO[bytes] | None] = [self._proc.stdout, self._proc.stderr]
        for index, pipe in enumerate(self._pipes):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
            loop.add_reader(pipe.fileno(), partial(self._on_readable, index))
        self._timer: Timer | None = loop.call_later(timeout, self._on_timeout)
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # an old kernel: look every few ms instead
            loop.call_later(EXIT_POLL_INTERVAL, self._poll_exit)
        else:
            loop.add_reader(self._pidfd, self._on_exit)

    @property
    def size(self) -> int:
        """Output bytes held, stdout and stderr together."""
        return self.output[0].size + self.output[1].size

    # -- events ----------------------------------------------------------------

    def _on_readable(self, index: int) -> None:
        """Read once from a pipe: one chunk per readiness event, as for sockets."""
        if not self._read(index):
            self._maybe_finish()  # EOF, or past the cap and killed

    def _read(self, index: int) -> bool:
        """One read into the stream's buffer; False at EOF, past the cap or on EAGAIN."""
        pipe = self._pipes[index]
        if pipe is None:
            return False
        room = self.max_output - self.size
        try:
            if room > 0:
                nbytes = os.readv(pipe.fileno(), [self.output[index].get_buffer(room)])
            else:
                nbytes = len(os.read(pipe.fileno(), 1))  # is there a byte past the cap?
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.warning("exec pid %d: reading its %s failed: %s",
                        self.pid, _STREAMS[index], exc.strerror)
            nbytes = 0
        if nbytes == 0:
            self._close_pipe(index)
            return False
        if room <= 0:
            self.truncated = True
            self._kill()  # first: closing the pipes first would make it a SIGPIPE death
            self._close_pipes()  # the rest of the output is not wanted
            return False
        self.output[index].buffer_updated(nbytes)
        return True

    def _on_timeout(self) -> None:
        self._timer = None
        self.timed_out = True
        self.kill()

    def _on_exit(self) -> None:
        """The pidfd is readable: the leader has exited (it is not reaped yet)."""
        assert self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        self._exited = True
        self._maybe_finish()

    def _poll_exit(self) -> None:
        # WNOWAIT: only look; the leader is reaped in _finish.
        if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            self._loop.call_later(EXIT_POLL_INTERVAL, self._poll_exit)
        else:
            self._exited = True
            self._maybe_finish()

    # -- killing and finishing -------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the whole process group; finish as soon as the leader is gone."""
        self._kill()
        self._maybe_finish()

    def abandon(self) -> None:
        """The client is gone: kill, drop the output, reap quietly."""
        self.abandoned = True
        self._close_pipes()
        self.output = (OutputBuffer(), OutputBuffer())
        self.kill()

    def _kill(self) -> None:
        self.killed = True
        self._signal_group()

    def _signal_group(self) -> None:
        # ESRCH: nothing left in the group; EPERM: only zombies are (some systems).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def _maybe_finish(self) -> None:
        if self.returncode is not None or not self._exited:
            return
        if self.killed:
            # What the group wrote before it died; then EOF or not, we are done
            # (a process that left the group may hold a pipe open for ever).
            for index in range(len(self._pipes)):
                while self._read(index):
                    pass
        elif any(self._pipes):
            return  # something in the group still holds a pipe: until EOF or timeout
        self._finish()

    def _finish(self) -> None:
        self._close_pipes()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._signal_group()  # whatever the command left running
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped behind our back: a bug elsewhere in the process
            log.error("exec pid %d was reaped by someone else; exit status unknown", self.pid)
            pid, status = self.pid, 255 << 8
        assert pid == self.pid, "the leader has exited: reaping it cannot wait"
        self.returncode = self._proc.returncode = os.waitstatus_to_exitcode(status)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._on_done(self)

    def _close_pipe(self, index: int) -> None:
        pipe = self._pipes[index]
        if pipe is not None:
            self._pipes[index] = None
            self._loop.remove_reader(pipe.fileno())
            pipe.close()

    def _close_pipes(self) -> None:
        for index in range(len(self._pipes)):
            self._close_pipe(index)
