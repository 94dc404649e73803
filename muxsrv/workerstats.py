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

``/clients`` lists the answering worker's connections, then every other
live worker's: each worker also serves a private Unix socket in the
directory (``<number>-<pid>.sock``, only ``/clients``, its own connections),
and the answering worker reads the others' lists from there without
blocking (a :class:`Relay` per worker, one after the other, its input read
only while fewer than ``RELAY_MAX_ITEMS`` of its items wait to be written,
given up after ``RELAY_TIMEOUT``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Final

from .admin import AdminServer, LocalSource, Wait
from .listening import CannotListen
from .loop import EVENT_READ
from .promtext import render_workers
from .stats import Histogram, merge_snapshots

if TYPE_CHECKING:
    from .auth import Tokens
    from .loop import EventLoop
    from .server import Server

__all__ = ["ENV_ADMIN_FD", "ENV_STATS_DIR", "ENV_WORKER", "Publisher", "WorkerAdmin",
           "WorkersSource", "admin_listener", "mark_dead", "take_from_env"]

log = logging.getLogger("muxsrv")

ENV_ADMIN_FD: Final = "MUXSRV_ADMIN_FD"
ENV_STATS_DIR: Final = "MUXSRV_STATS_DIR"
ENV_WORKER: Final = "MUXSRV_WORKER"
#: How often a worker writes its numbers for the others.
PUBLISH_EVERY: Final = 1.0
#: The largest snapshot file read (a worker's is a few KiB).
MAX_FILE: Final = 1 << 20
#: Another worker's /clients: items read ahead at most, and how long it may take.
RELAY_MAX_ITEMS: Final = 1000
RELAY_TIMEOUT: Final = 30.0
#: The longest line (one connection) or response head taken from another worker.
RELAY_MAX_LINE: Final = 64 * 1024
_RELAY_REQUEST: Final = b"GET /clients HTTP/1.0\r\n\r\n"


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
    with contextlib.suppress(OSError):
        (directory / f"{number}-{pid}.sock").unlink()


def private_socket(where: WorkerAdmin) -> socket.socket:
    """This worker's own /clients socket, for the others (the directory is the
    supervisor's, mode 0700)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(where.directory / f"{where.number}-{os.getpid()}.sock"))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


class NumberedSource:
    """One worker's own numbers, its connections named with its number (the private socket)."""

    def __init__(self, local: LocalSource, number: int) -> None:
        self.local = local
        self.number = number

    @property
    def draining(self) -> bool:
        return self.local.draining

    def stats(self) -> dict[str, Any]:
        return self.local.stats()

    def metrics(self) -> str:
        return self.local.metrics()

    def clients(self) -> Iterator[dict[str, Any] | Wait]:
        for item in self.local.clients():
            if isinstance(item, dict):
                item["worker"] = self.number
            yield item


class Relay:
    """Another worker's /clients, read over its private socket as it comes."""

    def __init__(self, loop: EventLoop, path: Path) -> None:
        self.loop = loop
        self.items: deque[dict[str, Any]] = deque()
        self.wait = Wait()
        self.done = False
        self.reading = False
        self._buf = b""
        self._head = False
        self._timer = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        try:
            self.sock.connect(str(path))
            self.sock.send(_RELAY_REQUEST)  # (a few bytes into an empty buffer)
        except OSError:
            self.close()
            return
        self.read(True)
        self._timer = loop.call_later(RELAY_TIMEOUT, self.close)

    def read(self, on: bool) -> None:
        if on != self.reading and not self.done:
            if on:
                self.loop.register(self.sock, EVENT_READ, self)
            else:
                self.loop.unregister(self.sock)
            self.reading = on

    def handle_event(self, mask: int) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._buf += data
        self._parse()
        if len(self.items) >= RELAY_MAX_ITEMS:
            self.read(False)  # until the items are written: ``more``
        self.wait.ready()

    def _parse(self) -> None:
        if not self._head:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > RELAY_MAX_LINE:
                    self.close()
                return
            self._buf = self._buf[end + 4:]
            self._head = True
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > RELAY_MAX_LINE:
            self.close()
            return
        for line in lines:
            line = line.strip().rstrip(b",")
            if line.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    item = json.loads(line)
                    if isinstance(item, dict):
                        self.items.append(item)

    def more(self) -> None:
        """Items were written: read on if few wait."""
        if len(self.items) < RELAY_MAX_ITEMS // 2:
            self.read(True)

    def close(self) -> None:
        if self.done:
            return
        self.read(False)
        self.done = True
        self.sock.close()
        if self._timer is not None:
            self._timer.cancel()
        self.wait.ready()


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

    def clients(self) -> Iterator[dict[str, Any] | Wait]:
        where = self.publisher.where
        yield from NumberedSource(self.local, where.number).clients()
        mine = where.directory / f"{where.number}-{os.getpid()}.sock"
        for path in sorted(where.directory.glob("*.sock")):
            if path == mine:
                continue
            relay = Relay(self.local.server.loop, path)
            try:
                while True:
                    while relay.items:
                        yield relay.items.popleft()
                        relay.more()
                    if relay.done:
                        break
                    yield relay.wait
            finally:
                relay.close()


def admin_listener(loop: EventLoop, server: Server, admin: tuple[str, int | None],
                   tokens: Tokens | None, shared: WorkerAdmin | None) -> AdminServer | None:
    """The admin listener: on a port of its own, or (a worker) the one its supervisor shares.

    Raises CannotListen.
    """
    local = LocalSource(server)
    if shared is not None and shared.sock is not None:
        publisher = Publisher(loop, local, shared)
        publisher.start()
        admin_server = AdminServer(loop, WorkersSource(local, publisher), server.stats, tokens)
        admin_server.listen(admin[0], 0, sock=shared.sock)
        admin_server.publisher = publisher
        try:  # the others read this worker's /clients here
            private = AdminServer(loop, NumberedSource(local, shared.number), SimpleNamespace(
                admin_accepted=0, admin_current=0, admin_refused=0))
            private.listen("", 0, sock=private_socket(shared))
        except OSError as exc:
            log.warning("no /clients of this worker for the others: %s", exc)
        return admin_server
    if admin[1] is None:
        return None
    admin_server = AdminServer(loop, local, server.stats, tokens)
    try:
        admin_server.listen(admin[0], admin[1])
    except OSError as exc:
        raise CannotListen(admin[0], admin[1], exc) from exc
    return admin_server
