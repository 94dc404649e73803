"""The log: levels per area, text or JSON lines, a file that logrotate can move.

Every module logs to a child of ``muxsrv`` named by its area (``AREAS``), so
configuration written for ``muxsrv`` goes on working and an operator can
route or silence one area: ``--log-level info,muxsrv.exec=warning`` keeps
everything at info but exec's two lines per command.

The two formats.  ``text`` is the line muxsrv always wrote::

    2026-12-06 21:07:08,123 muxsrv INFO: closing 127.0.0.1:5000: idle for 300 s

``json`` writes one object per line: ``time`` (UTC, ISO 8601, milliseconds),
``level``, ``logger``, ``event`` (the line's text), ``peer`` (the client,
``null`` when the event has none), then the event's own fields, given by the
log call as ``extra`` (exec's ``pid``, ``exit``, ``seconds`` ...), and ``exc``
with a traceback.  JSON escapes every control character, so a client's bytes
in an event can never start a line of their own.  With ``--workers`` each
line names its process: ``muxsrv worker 1234 INFO:`` / ``"worker": 1234``,
and the supervisor's ``muxsrv supervisor 1233 INFO:`` / ``"supervisor": 1233``.
The start-up line ("listening on ...") is not a log record: it stays on
stderr, in the form tools parse.

``--log-file FILE`` appends (``O_APPEND``: every process of ``--workers``
writes whole lines to the one file) and is reopened on SIGHUP: logrotate
renames the file, sends SIGHUP, and the next line goes to a new one.

Nothing here runs per message: the log calls stay lazy (``%``-style), and
the formatter runs only for records that pass the level.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Final, TextIO

__all__ = [
    "AREAS",
    "FORMATS",
    "LEVELS",
    "JsonFormatter",
    "LogFile",
    "add_options",
    "configure",
    "flatten",
    "from_options",
    "has_file",
    "log_levels",
    "reopen",
    "worker_sighup",
]

#: The loggers muxsrv's modules use, by area; all are children of ``muxsrv``.
AREAS: Final = {
    "muxsrv": "start, stop, SIGHUP",
    "muxsrv.server": "accepting, the drain",
    "muxsrv.conn": "connections: closes, errors, handler failures",
    "muxsrv.limits": "connections refused or closed by a limit",
    "muxsrv.loop": "errors in loop callbacks",
    "muxsrv.exec": "exec's commands (two lines each at info)",
    "muxsrv.workers": "--workers: the supervisor and its workers",
    "muxsrv.tls": "TLS handshakes and files",
    "muxsrv.auth": "authentication and lockouts",
    "muxsrv.proxy": "PROXY protocol headers",
    "muxsrv.outbound": "outbound connections",
    "muxsrv.udp": "--udp: datagrams and replies dropped, peers' instances",
    "muxsrv.locust": "the Locust kit",
}
LEVELS: Final = ("debug", "info", "warning", "error")
FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s muxsrv{who} %(levelname)s: %(message)s"
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
#: Attributes every LogRecord has: whatever else a record carries came from ``extra``.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}


def add_options(parser: argparse.ArgumentParser) -> None:
    """The server's --log-level, --log-format and --log-file."""
    add = parser.add_argument
    add("--log-level", type=log_levels, action="append", metavar="LEVEL[,LOGGER=LEVEL...]",
        help="debug, info, warning or error, for every logger or, as muxsrv.exec=warning, for "
             "one area (muxsrv.conn, muxsrv.exec, muxsrv.workers ...: see the README); "
             "comma-separated or repeated, later entries win (default: info)")
    add("--log-format", choices=FORMATS, default="text",
        help="text: the usual lines (default); json: one object per line (time, level, "
             "logger, event, peer and the event's fields); the start-up line stays text")
    add("--log-file", metavar="FILE",
        help="append the log to FILE instead of stderr (the start-up line stays on stderr); "
             "SIGHUP reopens it, for logrotate")


def from_options(options: argparse.Namespace, *, worker: bool = False,
                 supervisor: bool = False) -> LogFile | None:
    """:func:`configure` as the options say; raises OSError if the file cannot be opened."""
    return configure(flatten(options.log_level), options.log_format, options.log_file,
                     worker=worker, supervisor=supervisor)


def log_levels(text: str) -> list[tuple[str, int]]:
    """argparse type of ``--log-level``: ``LEVEL`` and ``LOGGER=LEVEL`` entries, comma-separated.

    ``""`` names the root (every logger not given a level of its own).
    """
    entries = []
    for entry in text.split(","):
        name, sep, level = entry.strip().rpartition("=")
        name, level = name.strip(), level.strip().lower()
        if level not in LEVELS:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {level!r} (choose from {', '.join(LEVELS)}, "
                f"or LOGGER=LEVEL such as muxsrv.exec=warning)")
        if sep and not _NAME.match(name):
            raise argparse.ArgumentTypeError(f"{entry.strip()!r}: not a logger name before '='")
        top = ".".join(name.split(".")[:2])
        if name.startswith("muxsrv.") and top not in AREAS:
            raise argparse.ArgumentTypeError(
                f"unknown logger {name!r}; muxsrv's are {', '.join(AREAS)}")
        entries.append((name, logging.getLevelName(level.upper())))
    return entries


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring); ``fixed`` fields in every one."""

    def __init__(self, fixed: dict[str, object] | None = None) -> None:
        super().__init__()
        self.fixed = dict(fixed or {})

    def format(self, record: logging.LogRecord) -> str:
        when = time.gmtime(record.created)
        obj: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", when) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            "peer": getattr(record, "peer", None),
            **self.fixed,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in obj:
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class LogFile(logging.FileHandler):
    """``--log-file``: appended to, and reopened by :meth:`reopen` (SIGHUP)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8", errors="backslashreplace")

    def reopen(self) -> bool:
        """Open the path anew (logrotate moved the file); False, and the old file kept, if
        it cannot be opened."""
        try:
            stream = self._open()
        except OSError as exc:
            logging.getLogger("muxsrv").error("cannot reopen --log-file %s: %s; writing to "
                                              "the file opened before", self.baseFilename,
                                              exc.strerror or exc)
            return False
        with self.lock:  # type: ignore[union-attr]  # set by createLock in __init__
            old, self.stream = self.stream, stream
        if old is not None:
            old.close()
        return True


_installed: list[logging.Handler] = []


def configure(levels: Iterable[tuple[str, int]], form: str = "text", path: str | None = None,
              *, worker: bool = False, supervisor: bool = False,
              stream: TextIO | None = None) -> LogFile | None:
    """Set the levels and put the one handler on the root logger; the log file if any.

    Raises OSError if ``path`` cannot be opened.  A handler installed by an earlier
    call is replaced; handlers others put there are left alone.
    """
    handler: logging.Handler = (LogFile(path) if path is not None
                                else logging.StreamHandler(stream or sys.stderr))
    who = f" worker {os.getpid()}" if worker else f" supervisor {os.getpid()}" if supervisor else ""
    if form == "json":
        fixed: dict[str, object] = ({"worker": os.getpid()} if worker else
                                    {"supervisor": os.getpid()} if supervisor else {})
        handler.setFormatter(JsonFormatter(fixed))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.format(who=who)))
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
        old.close()
    _installed[:] = [handler]
    root.addHandler(handler)
    for name, level in levels:
        (logging.getLogger(name) if name else root).setLevel(level)
    return handler if isinstance(handler, LogFile) else None


def flatten(values: Sequence[list[tuple[str, int]]] | None) -> list[tuple[str, int]]:
    """The repeated ``--log-level`` options as one list (later entries win); info by default."""
    return [("", logging.INFO), *(entry for value in values or () for entry in value)]


def reopen() -> str:
    """SIGHUP: reopen the log file if there is one; what was done, for the SIGHUP line."""
    files = [h for h in _installed if isinstance(h, LogFile)]
    if not files:
        return "the log goes to stderr (no log file to reopen)"
    done = [f"reopened --log-file {h.baseFilename}" for h in files if h.reopen()]
    return "; ".join(done) or "kept the log file opened before"


def has_file() -> bool:
    """Whether the log goes to a ``--log-file`` (that SIGHUP reopens)."""
    return any(isinstance(h, LogFile) for h in _installed)


def worker_sighup() -> None:
    """SIGHUP in a ``--workers`` worker: the supervisor reloads; the worker reopens its file."""
    log = logging.getLogger("muxsrv")
    if has_file():
        log.info("SIGHUP: %s", reopen())
    else:
        log.debug("SIGHUP ignored: the --workers supervisor reloads")
