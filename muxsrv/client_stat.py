"""``muxsrv-client --stat``: a line a second from the admin port, as ``redis-cli --stat``.

Each interval it fetches ``GET /stats`` (the admin listener, ``--admin-port``
on the server) and prints one line: connections open now, messages per
second in and out, MB/s in and out (wire bytes, framing included), the
largest p99 latency among the handlers (since the server started: the
histogram is cumulative), and handler errors per second.  Rates are the
differences between two fetches over the time that passed between them.
A header line comes first and again every ``HEADER_EVERY`` lines.  Against
a ``--workers`` server the top-level figures are already the sums.

The numbers are in :class:`Sample` and :class:`Display`, with no I/O, so the
lines are tested exactly; :func:`run` is the loop around them.  A first
fetch that fails is one line and exit status 1; a later one is one line (and
one more when the server answers again) and the loop goes on: a restart is
what an operator watches this for.  Ctrl-C ends it with status 0.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TextIO

from .options import positive_seconds

__all__ = ["DEFAULT_ADMIN", "HEADER_EVERY", "AdminError", "Display", "Sample", "add_options",
           "fetch", "parse_admin", "run"]

#: The admin address the docs suggest (``--admin-port 9998``).
DEFAULT_ADMIN: Final = ("127.0.0.1", 9998)
#: A header line every this many lines, as redis-cli --stat.
HEADER_EVERY: Final = 20
#: /stats is a few KiB, with every worker's detail a few more: more is not an admin port.
MAX_BODY: Final = 8 << 20
_COLUMNS: Final = (("conns", 7), ("in/s", 9), ("out/s", 9), ("MB/s in", 9), ("MB/s out", 9),
                   ("p99", 10), ("err/s", 8))


def add_options(parser: argparse.ArgumentParser) -> None:
    """muxsrv-client's --stat, --admin and --interval."""
    add = parser.add_argument
    add("--stat", action="store_true",
        help="print a line a second from the server's admin port (connections, messages/s, "
        "MB/s, p99, errors/s), a header every 20 lines, until Ctrl-C")
    add("--admin", type=parse_admin, default=DEFAULT_ADMIN, metavar="HOST:PORT",
        help="with --stat: the server's admin listener (default: 127.0.0.1:9998)")
    add("--interval", type=positive_seconds, default=1.0, metavar="SECONDS",
        help="with --stat: seconds between lines (default: 1)")


def parse_admin(text: str) -> tuple[str, int]:
    """argparse type of ``--admin`` (and the Locust kit's ``--mux-admin``): HOST:PORT,
    IPv6 as ``[::1]:9998``."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT, such as 127.0.0.1:9998")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be from 1 to 65535")
    return host, int(port)


class AdminError(Exception):
    """The admin port did not give /stats; ``str()`` says why, in one line."""


@dataclass(frozen=True)
class Sample:
    """What one line needs from one /stats, and when it was fetched (monotonic)."""

    at: float
    current: int
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    handler_errors: int
    p99_us: float | None  # the largest handler's; None before any message
    workers: int = 0  # 0: not a --workers server

    @classmethod
    def from_stats(cls, stats: dict[str, Any], at: float) -> Sample:
        """Raises AdminError if the JSON is not /stats's."""
        try:
            latency = stats.get("latency") or {}
            p99s = [float(h["p99_us"]) for h in latency.values()
                    if h.get("count", 1) and h.get("p99_us") is not None]
            return cls(
                at=at,
                current=int(stats["connections"]["current"]),
                messages_in=int(stats["messages"]["in"]),
                messages_out=int(stats["messages"]["out"]),
                bytes_in=int(stats["bytes"]["in"]),
                bytes_out=int(stats["bytes"]["out"]),
                handler_errors=int(stats.get("handler_errors", 0)),
                p99_us=max(p99s) if p99s else None,
                workers=len(stats.get("workers") or ()),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AdminError(f"not muxsrv's /stats (no {exc})") from None


def _rate(new: int, old: int, seconds: float) -> float:
    # A counter that went down: the server restarted; what it counted since is the rate.
    return (new - old if new >= old else new) / seconds


def count(value: float) -> str:
    """A rate in 5 characters or so: 950, 12.3k, 4.56M."""
    if value < 10_000:
        return f"{value:.0f}" if value >= 100 or value == int(value) else f"{value:.1f}"
    if value < 1e6:
        return f"{value / 1e3:.1f}k"
    return f"{value / 1e6:.2f}M"


def duration(us: float | None, micro: str = "µs") -> str:
    """A latency from microseconds: 45µs, 1.25ms, 3.2s; '-' before any message."""
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f}{micro}"
    if us < 1e6:
        return f"{us / 1e3:.3g}ms"
    return f"{us / 1e6:.3g}s"


class Display:
    """Turns samples into lines: a header, then one line per sample after the first."""

    def __init__(self, micro: str = "µs") -> None:
        self.micro = micro
        self.last: Sample | None = None
        self.lines = 0

    @staticmethod
    def header() -> str:
        return " ".join(name.rjust(width) for name, width in _COLUMNS)

    def add(self, sample: Sample) -> list[str]:
        """The lines to print for this sample (none for the first: no rates yet)."""
        last, self.last = self.last, sample
        if last is None or sample.at <= last.at:
            return []
        took = sample.at - last.at
        out = [self.header()] if self.lines % HEADER_EVERY == 0 else []
        self.lines += 1
        cells = (
            str(sample.current),
            count(_rate(sample.messages_in, last.messages_in, took)),
            count(_rate(sample.messages_out, last.messages_out, took)),
            f"{_rate(sample.bytes_in, last.bytes_in, took) / 1e6:.2f}",
            f"{_rate(sample.bytes_out, last.bytes_out, took) / 1e6:.2f}",
            duration(sample.p99_us, self.micro),
            count(_rate(sample.handler_errors, last.handler_errors, took)),
        )
        widths = [width for _, width in _COLUMNS]
        out.append(" ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True)))
        return out


def fetch(host: str, port: int, timeout: float, token: bytes | None = None) -> dict[str, Any]:
    """GET /stats; raises AdminError."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = {"Accept": "application/json", "Connection": "close"}
    if token is not None:
        if not all(0x21 <= byte <= 0x7E for byte in token):
            raise AdminError("the token has bytes an HTTP header cannot carry")
        headers["Authorization"] = "Bearer " + token.decode("ascii", "replace")
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/stats", headers=headers)
        response = conn.getresponse()
        body = response.read(MAX_BODY + 1)
    except TimeoutError:
        raise AdminError(f"admin port {where}: no answer in {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
        raise AdminError(f"cannot reach the admin port {where}: {why}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise AdminError(f"admin port {where}: HTTP {response.status} {response.reason} for "
                         "/stats" + (" (give the token: --token-file)"
                                     if response.status == 401 else ""))
    if len(body) > MAX_BODY:
        raise AdminError(f"admin port {where}: /stats over {MAX_BODY >> 20} MiB")
    try:
        stats = json.loads(body)
    except ValueError:
        raise AdminError(f"admin port {where}: /stats is not JSON") from None
    if not isinstance(stats, dict):
        raise AdminError(f"admin port {where}: /stats is not a JSON object")
    return stats


def run(host: str, port: int, *, interval: float = 1.0, timeout: float = 5.0,
        token: bytes | None = None, out: TextIO | None = None, err: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Print lines until Ctrl-C (status 0); status 1 if the first fetch fails."""
    out = out or sys.stdout
    err = err or sys.stderr
    encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "")
    display = Display("µs" if encoding == "utf8" else "us")
    prog = "muxsrv-client"
    try:
        try:
            first = Sample.from_stats(fetch(host, port, timeout, token), clock())
        except AdminError as exc:
            print(f"{prog}: error: {exc}", file=err, flush=True)
            return 1
        display.add(first)
        workers = f", {first.workers} workers" if first.workers else ""
        print(f"muxsrv at {host}:{port}{workers}: a line every {interval:g} s, "
              "p99 since the server started; Ctrl-C to stop", file=out, flush=True)
        failing = False
        due = first.at
        while True:
            due += interval
            sleep(max(0.0, due - clock()))
            try:
                sample = Sample.from_stats(fetch(host, port, timeout, token), clock())
            except AdminError as exc:
                if not failing:
                    print(f"{prog}: {exc}; trying again every {interval:g} s", file=err,
                          flush=True)
                failing = True
                display.last = None  # no rate across the gap
                due = clock()
                continue
            if failing:
                print(f"{prog}: the admin port answers again", file=err, flush=True)
                failing = False
            for line in display.add(sample):
                print(line, file=out)
            out.flush()
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # | head: the reader has had enough
        return 0
