"""One admin port for ``--workers N``: the workers share it, and read each other's numbers.

The supervisor binds the admin port once (like the data ports) and makes a
private directory (mode 0700); every worker inherits the listening socket
(``MUXSRV_ADMIN_FD``), the directory (``MUXSRV_STATS_DIR``) and its number
(``MUXSRV_WORKER``, in the order the supervisor started them).  Each worker
writes its counters and histogram buckets there every ``PUBLISH_EVERY``
seconds and once more as it stops (``<number>-<pid>.json``, written whole and
renamed: a reader never sees half a file).  Whichever worker accepts an admin
connection answers it from those files, its own numbers taken live.  When a
worker exits the supervisor renames its file ``<number>-<pid>.dead.json``:
its counters stay in the sums (what it had counted by its last write), its
gauges (connections open, output pending) count 0, and it is listed with
``"alive": false``.  The supervisor removes the directory when it exits.

``/clients`` lists the connections of the worker that answers (each worker
has its own; a client of another worker is seen through that worker's
``/stats`` detail, not listed): see README.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .promtext import render_workers
from .stats import Histogram, merge_snapshots

if TYPE_CHECKING:
    from .admin import LocalSource
    from .loop import EventLoop

__all__ = ["ENV_ADMIN_FD", "ENV_STATS_DIR", "ENV_WORKER", "Publisher", "WorkerAdmin",
           "WorkersSource", "mark_dead", "take_from_env"]

log = logging.getLogger("muxsrv")

ENV_ADMIN_FD: Final = "MUXSRV_ADMIN_FD"
ENV_STATS_DIR: Final = "MUXSRV_STATS_DIR"
ENV_WORKER: Final = "MUXSRV_WORKER"
#: How often a worker writes its numbers for the others.
PUBLISH_EVERY: Final = 1.0
#: The largest snapshot file read (a worker's is a few KiB).
MAX_FILE: Final = 1 << 20


@dataclass
class WorkerAdmin:
    directory: Path
    sock: socket.socket | None
    number: int


def take_from_env(is_worker: bool) -> WorkerAdmin | None:
    """The admin port and directory a supervisor handed over, taken out of the environment
    (nothing a worker starts sees them); None outside a worker."""
    fd = os.environ.pop(ENV_ADMIN_FD, None)
    directory = os.environ.pop(ENV_STATS_DIR, None)
    number = os.environ.pop(ENV_WORKER, None)
    if not is_worker or directory is None or number is None or not number.isdigit():
        return None
    sock = None
    if fd is not None and fd.isdigit():
        sock = socket.socket(fileno=int(fd))
        sock.set_inheritable(False)
    return WorkerAdmin(Path(directory), sock, int(number))


def _file(directory: Path, number: int, pid: int, dead: bool = False) -> Path:
    return directory / f"{number}-{pid}{'.dead' if dead else ''}.json"


def mark_dead(directory: Path, number: int, pid: int) -> None:
    """The supervisor: worker ``pid`` has exited; its file stays, marked."""
    with contextlib.suppress(OSError):
        os.replace(_file(directory, number, pid), _file(directory, number, pid, dead=True))


class Publisher:
    """A worker writes its fine snapshot for the others, every ``PUBLISH_EVERY`` s."""

    def __init__(self, loop: EventLoop, source: LocalSource, where: WorkerAdmin) -> None:
        self.loop = loop
        self.source = source
        self.where = where
        self.path = _file(where.directory, where.number, os.getpid())

    def start(self) -> None:
        self.publish()

    def snapshot(self) -> dict[str, Any]:
        snap = self.source.stats(fine=True)
        snap.update(worker=self.where.number, pid=os.getpid(), alive=True)
        return snap

    def publish(self, again: bool = True) -> None:
        try:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write this worker's numbers for the admin port: %s", exc)
        if again:
            self.loop.call_later(PUBLISH_EVERY, self.publish)


class WorkersSource:
    """Every worker's numbers, as the admin listener shows them."""

    def __init__(self, local: LocalSource, publisher: Publisher) -> None:
        self.local = local
        self.publisher = publisher

    @property
    def draining(self) -> bool:
        return self.local.draining

    def _snapshots(self) -> list[dict[str, Any]]:
        mine = self.publisher.path
        snaps = [self.publisher.snapshot()]
        for path in sorted(self.publisher.where.directory.glob("*.json")):
            if path == mine:
                continue
            try:
                if path.stat().st_size > MAX_FILE:
                    continue
                snap = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # (being replaced just now, or gone)
            if isinstance(snap, dict):
                snap["alive"] = not path.name.endswith(".dead.json")
                snaps.append(snap)
        snaps.sort(key=lambda s: (s.get("worker", 0), s.get("pid", 0)))
        return snaps

    def stats(self) -> dict[str, Any]:
        merged = merge_snapshots(self._snapshots())
        merged.pop("histograms", None)
        return merged

    def metrics(self) -> str:
        parts: list[tuple[str | None, dict[str, Any], dict[str, Histogram]]] = []
        for snap in self._snapshots():
            hists: dict[str, Histogram] = {}
            for name, buckets in snap.get("histograms", {}).items():
                hist = hists[name] = Histogram()
                hist.merge_sparse(buckets)
            parts.append((str(snap.get("worker")), snap, hists))
        return render_workers(parts)

    def clients(self) -> Iterator[dict[str, Any]]:
        number = self.publisher.where.number
        for item in self.local.clients():
            item["worker"] = number
            yield item
