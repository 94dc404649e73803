"""What a ``--workers`` worker is handed by its supervisor, and what it tells it back.

The supervisor (``supervisor.py``) starts each worker as a fresh interpreter
with three environment variables: ``MUXSRV_LISTEN_FDS``, the descriptors of
the listening sockets it inherits; ``MUXSRV_READY_FD``, the write end of a
pipe; and ``MUXSRV_SUPERVISOR_PID``, the supervisor's PID.  The variables
count only in the process the supervisor started itself: a user who exported
them by accident, or a process started by a worker's handler, must not
adopt whatever descriptors they name.  So :func:`inherited` adopts the
sockets only when ``MUXSRV_SUPERVISOR_PID`` is the PID of this process's
parent, and otherwise ignores the variables (the process binds its own
port).  Either way it takes all three out of the environment at once, so
nothing the process starts sees them.

Over the pipe the worker says one thing, once: ``R`` when its loop serves
(``Handover.report_ready``), or ``E`` and the one line that explains why it
cannot start (``report_failure``: a handler that no longer imports, a bad
option), which the supervisor then logs in its own line about that worker
instead of leaving it to a line of the worker's.
"""

from __future__ import annotations

import logging
import os
import select
import socket
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ENV_LISTEN",
    "ENV_READY",
    "ENV_SUPERVISOR",
    "FAILED",
    "READY",
    "Handover",
    "inherited",
]

log = logging.getLogger("muxsrv.workers")

#: The environment variables that hand a worker its listening sockets and readiness pipe,
#: and name the process that set them.
ENV_LISTEN: Final = "MUXSRV_LISTEN_FDS"
ENV_READY: Final = "MUXSRV_READY_FD"
ENV_SUPERVISOR: Final = "MUXSRV_SUPERVISOR_PID"
#: The first byte a worker writes to its readiness pipe: it serves, or it cannot start.
READY: Final = b"R"
FAILED: Final = b"E"
#: A failure's text is cut to fit one atomic pipe write, well within PIPE_BUF.
MAX_FAILURE: Final = min(select.PIPE_BUF, 4096) - 1


@dataclass
class Handover:
    """What this process was handed: its supervisor's listening sockets and readiness
    pipe (``socks`` None outside a worker), or why variables naming them were ignored."""

    socks: list[socket.socket] | None = None
    ready_fd: int = -1
    ignored: str = ""

    def report_ready(self) -> None:
        """The worker's loop runs: one byte tells the supervisor (whom a failure to
        tell need not stop)."""
        try:
            os.write(self.ready_fd, READY)
        except OSError as exc:
            log.warning("cannot tell the supervisor this worker serves: %s", exc.strerror)
        finally:
            self._close()

    def report_failure(self, message: str) -> bool:
        """The worker cannot start: tell the supervisor why.  False if it cannot be told
        (not a worker, or it has been told already): then say it on stderr."""
        if self.ready_fd < 0:
            return False
        try:
            data = FAILED + message.encode("utf-8", "replace")[:MAX_FAILURE]
            return os.write(self.ready_fd, data) == len(data)
        except OSError:
            return False
        finally:
            self._close()

    def _close(self) -> None:
        fd, self.ready_fd = self.ready_fd, -1
        os.close(fd)


def inherited() -> Handover:
    """The sockets and pipe from the environment, taken out of it (see the module docstring).

    Raises ValueError if the variables come from this process's parent but do not name
    listening sockets.
    """
    listen = os.environ.pop(ENV_LISTEN, None)
    ready = os.environ.pop(ENV_READY, None)
    parent = os.environ.pop(ENV_SUPERVISOR, None)
    if listen is None:
        if ready is None and parent is None:
            return Handover()
        return Handover(ignored=f"{ENV_READY} or {ENV_SUPERVISOR} without {ENV_LISTEN}")
    if parent is None or not parent.isdigit() or int(parent) != os.getppid():
        return Handover(ignored=f"{ENV_LISTEN} set, but {ENV_SUPERVISOR}={parent!r} is not "
                                f"this process's parent (pid {os.getppid()})")
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
    return Handover(socks, ready_fd)
