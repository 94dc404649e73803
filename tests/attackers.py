"""The issue's attacks at fixed rates, as a program of their own (one process, one core).

    python tests/attackers.py NAME HOST PORT SECONDS

runs attack NAME against HOST:PORT for SECONDS, then resets every connection it
still has and prints one JSON line: what it did and how the server ended its
connections (``closed``: the error texts, ``reset``, ``eof``).  A process of
its own so that its work never holds the test process's GIL while the test
times the good clients; every loop is bounded in time and in count.
"""

from __future__ import annotations

import contextlib
import errno
import json
import selectors
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable

HDR = struct.Struct(">I")
MiB = 1 << 20
TICK = 0.005


class Attack:
    def __init__(self, host: str, port: int, seconds: float) -> None:
        self.address = (host, port)
        self.end = time.monotonic() + seconds
        self.sel = selectors.DefaultSelector()
        self.socks: dict[socket.socket, bytearray] = {}  # what each received
        self.outcomes: Counter[str] = Counter()
        self.opened = 0
        self.sent = 0

    def open(self, nodelay: bool = False) -> socket.socket:
        s = socket.create_connection(self.address, timeout=5)
        if nodelay:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        self.socks[s] = bytearray()
        self.sel.register(s, selectors.EVENT_READ)
        self.opened += 1
        return s

    def send(self, s: socket.socket, data: bytes) -> int:
        try:
            n = s.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.ended(s, "reset" if exc.errno == errno.ECONNRESET else "eof")
            return -1
        self.sent += n
        return n

    def poll(self, timeout: float = 0.0, read: bool = True) -> None:
        """Notice the connections the server ended (reading what it said first)."""
        for key, _ in self.sel.select(timeout):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if not read:
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                self.ended(s, "reset")
                continue
            if not data:
                self.ended(s, self.verdict(self.socks[s]))
            else:
                got = self.socks[s]
                got += data
                del got[: max(0, len(got) - 4096)]  # the error frame is at the end

    @staticmethod
    def verdict(got: bytearray) -> str:
        for start in range(len(got) - 4, -1, -1):  # the last error frame, if any
            (word,) = HDR.unpack_from(got, start)
            size = word & 0x7FFFFFFF
            if word & 0x80000000 and start + 4 + size == len(got) and size < 1000:
                return "closed: " + got[start + 4 :].decode("utf-8", "replace")
        return "eof"

    def ended(self, s: socket.socket, outcome: str) -> None:
        if s in self.socks:
            self.outcomes[outcome] += 1
            del self.socks[s]
            self.sel.unregister(s)
            s.close()

    def running(self) -> bool:
        return time.monotonic() < self.end

    def finish(self) -> dict[str, object]:
        still = len(self.socks)
        for s in list(self.socks):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sel.unregister(s)
            s.close()
        self.socks.clear()
        return {"opened": self.opened, "sent": self.sent, "open_at_end": still,
                "outcomes": dict(self.outcomes)}


def slowloris(a: Attack, conns: int = 2000, size: int = 1000, interval: float = 2.0) -> None:
    """``conns`` connections each announcing ``size`` bytes, then a byte every ``interval``."""
    order: list[socket.socket] = []
    while a.running() and len(order) < conns:  # (as fast as connect goes: ~5,000 a second)
        s = a.open()
        a.send(s, HDR.pack(size) + b"x")
        order.append(s)
    i = 0
    per_tick = max(1, int(conns * TICK / interval))
    while a.running():
        t = time.monotonic()
        for _ in range(per_tick):
            s = order[i % len(order)]
            i += 1
            if s in a.socks:
                a.send(s, b"x")
        a.poll(max(0.0, TICK - (time.monotonic() - t)))


def partial(a: Attack, conns: int = 50, size: int = 16 * MiB - 1, body: int = 15_000_000) -> None:
    """``conns`` connections each announcing ``size`` bytes and sending ``body`` of them."""
    left = {a.open(): body for _ in range(conns)}
    for s in left:
        a.send(s, HDR.pack(size))
    piece = bytes(256 * 1024)
    while a.running():
        for s, n in list(left.items()):
            if n > 0 and s in a.socks:
                sent = a.send(s, piece[:n])
                if sent > 0:
                    left[s] = n - sent
        a.poll(0.002)


def drip(a: Attack, conns: int = 10, size: int = 4_000_000, rate: int = 100_000) -> None:
    """``conns`` connections dripping a ``size`` body, ``rate`` one-byte sends a second in all;
    a connection the server closes is replaced."""
    socks = [a.open(nodelay=True) for _ in range(conns)]
    for s in socks:
        a.send(s, HDR.pack(size))
    began, done = time.monotonic(), 0
    while a.running():
        due = int((time.monotonic() - began) * rate)
        while done < due:
            s = socks[done % conns]
            if s not in a.socks:
                s = socks[done % conns] = a.open(nodelay=True)
                a.send(s, HDR.pack(size))
            a.send(s, b"d")
            done += 1
        a.poll(0.001)


def nonreader(a: Attack, conns: int = 100, total: int = 16 * MiB, payload: int = 64) -> None:
    """``conns`` connections each pipelining ``total`` bytes of echo requests, reading none."""
    one = HDR.pack(payload) + b"n" * payload
    batch = one * (65536 // len(one))
    left = {a.open(): total for _ in range(conns)}
    while a.running():
        progress = False
        for s, n in list(left.items()):
            if n > 0 and s in a.socks:
                sent = a.send(s, batch)
                if sent > 0:
                    left[s] = n - sent
                    progress = True
        if not progress:
            time.sleep(0.01)


def slowreader(a: Attack, replies: int = 1_500_000, read_rate: int = 2 * MiB) -> None:
    """One connection with ``replies`` empty requests pipelined, reading ``read_rate`` a second."""
    s = a.open()
    data = HDR.pack(0) * replies
    view = memoryview(data)
    began, read = time.monotonic(), 0
    while a.running() and s in a.socks:
        if view:
            n = a.send(s, bytes(view[:65536]))
            if n > 0:
                view = view[n:]
        allowed = int((time.monotonic() - began) * read_rate) - read
        if allowed > 0:
            try:
                read += len(s.recv(min(allowed, 65536)))
            except BlockingIOError:
                pass
            except OSError:
                a.ended(s, "reset")
        time.sleep(0.002)


def churn(a: Attack, rate: int = 5000) -> None:
    """``rate`` connections a second: connect, one echo request, close (every other: reset)."""
    began, done = time.monotonic(), 0
    request = HDR.pack(5) + b"churn"
    while a.running():
        due = int((time.monotonic() - began) * rate)
        while done < due and a.running():
            try:
                s = socket.create_connection(a.address, timeout=2)
            except OSError:
                a.outcomes["connect failed"] += 1
                done += 1
                continue
            a.opened += 1
            with contextlib.suppress(OSError):
                s.sendall(request)
                a.sent += len(request)
                if done % 2:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            done += 1
        time.sleep(0.001)
    a.outcomes["churned"] = done


ATTACKS: dict[str, Callable[..., None]] = {
    f.__name__: f for f in (slowloris, partial, drip, nonreader, slowreader, churn)
}


def main(argv: list[str]) -> int:
    name, host, port, seconds = argv[0], argv[1], int(argv[2]), float(argv[3])
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    attack = Attack(host, port, seconds)
    began = time.monotonic()
    try:
        ATTACKS[name](attack)
        attack.poll(0.0)
    finally:
        report = attack.finish()
    report["seconds"] = time.monotonic() - began
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
