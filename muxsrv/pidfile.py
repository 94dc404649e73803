"""``--pid-file FILE``: the serving process's PID, for ``kill -HUP $(cat FILE)`` and systemd.

Written (atomically: a temporary file renamed over it) once the server
listens, or once the ``--workers`` parent holds the port; removed when that
process exits.  A ``--workers`` worker writes none (the supervisor's PID is
the file's), and a forked child never removes its parent's file.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["PidFile", "PidFileError"]


class PidFileError(Exception):
    """The PID file cannot be written; the message names it."""


class PidFile:
    """One process's PID file (``path`` None: none asked for; every call does nothing)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._owner = 0  # the PID that wrote it: only that process removes it

    def write(self) -> None:
        """Write this process's PID; PidFileError if the file cannot be written."""
        if self.path is None:
            return
        pid = os.getpid()
        temporary = f"{self.path}.{pid}.tmp"
        try:
            with open(temporary, "w") as file:
                file.write(f"{pid}\n")
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise PidFileError(f"--pid-file {self.path}: {exc.strerror or exc}") from None
        self._owner = pid

    def remove(self) -> None:
        """Remove the file if this process wrote it (and it still names this process)."""
        if self.path is None or self._owner != os.getpid():
            return
        self._owner = 0
        with contextlib.suppress(OSError):
            with open(self.path) as file:
                if file.read().strip() != str(os.getpid()):
                    return  # another server's now
            os.unlink(self.path)
