"""Counters and latency histograms: plain data, no I/O, nothing imported from above.

What costs nothing per message: a connection counts its own messages per read
batch (``Connection``: how many replies a call queued), the kernel counts its
bytes over TCP (``Transport.byte_counts``: elsewhere ``recv``/``send``'s), and the
server-wide totals are summed only when someone asks (``Stats.snapshot``): what
closed connections had counted (``retire``) plus what the open ones have now.
Events that happen once per connection or less often (accepted, refused,
closed by reason, EMFILE, flow-control pauses) are counted where they happen.

Latency is a log-linear :class:`Histogram` (the HdrHistogram scheme): values in
whole microseconds, exact below 256 µs, then 128 buckets per power of two (so
within 1%, about two significant digits) up to 100 s.  A batch of messages read
answered in the same loop turn is counted in ``Histogram.turn`` and recorded
once at the turn's end (one clock read per turn); a reply sent later reads
the clock itself (see README, "What the latency covers").
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["COARSE_BUCKETS", "EXEC", "Histogram", "Stats", "merge_snapshots"]

#: Sub-buckets per power of two (the precision: 1/128 < 1%).
SUB_BITS: Final = 7
_SUB: Final = 1 << SUB_BITS
#: The largest value kept, in microseconds (100 s); above it: counted as 100 s.
MAX_US: Final = 100_000_000
_SIZE: Final = ((MAX_US.bit_length() - SUB_BITS - 1) << SUB_BITS) + 2 * _SUB
#: The last bucket (100 s and more).
TOP_BUCKET: Final = _SIZE - 1
#: Values below this have a bucket each.
EXACT_US: Final = 2 * _SUB
#: The Prometheus buckets in seconds: 1-2-5 per decade from 10 µs to 100 s.
COARSE_BUCKETS: Final = tuple(float(f"{m}e{e}") for e in range(-5, 3) for m in (1, 2, 5)
                              if e < 2 or m == 1)
#: The percentiles /stats reports, and their names.
PERCENTILES: Final = (("p50_us", 50.0), ("p90_us", 90.0), ("p99_us", 99.0), ("p999_us", 99.9))


def bucket_of(us: int) -> int:
    """The fine bucket of a value in microseconds."""
    shift = us.bit_length() - SUB_BITS - 1
    if shift <= 0:
        return us
    return (shift << SUB_BITS) + (us >> shift)


def bucket_range(index: int) -> tuple[int, int]:
    """The values (µs) of a fine bucket: ``lo <= v < hi``."""
    if index < 2 * _SUB:
        return index, index + 1
    shift = (index >> SUB_BITS) - 1
    mantissa = index - (shift << SUB_BITS)
    return mantissa << shift, min((mantissa + 1) << shift, MAX_US + 1)





class Histogram:
    """A log-linear latency histogram in microseconds; ``add(seconds, count)``.

    ``add`` only bumps a bucket (it runs once per answered batch): the count, the
    sum (to within the buckets' 1%) and the max (its bucket's top) are read off
    the buckets when asked.
    """

    __slots__ = ("counts", "turn")

    def __init__(self) -> None:
        self.counts = [0] * _SIZE
        #: Messages answered in full in this loop turn by the read that brought them
        #: (connections add; the loop calls ``turn_ended`` once per turn: ``EventLoop.add_tally``).
        self.turn = 0

    def turn_ended(self, seconds: float) -> None:
        """This turn's messages, all timed by the turn's duration (one clock read)."""
        count, self.turn = self.turn, 0
        us = int(seconds * 1e6)  # (add_us, inline: once per loop turn)
        if us >= EXACT_US:
            shift = us.bit_length() - SUB_BITS - 1
            us = (shift << SUB_BITS) + (us >> shift) if us < MAX_US else TOP_BUCKET
        elif us < 0:
            us = 0
        self.counts[us] += count

    def add(self, seconds: float, count: int = 1) -> None:
        self.add_us(int(seconds * 1e6), count)

    def add_us(self, us: int, count: int = 1) -> None:
        """``count`` values of ``us`` microseconds (connections inline the case below 256)."""
        if us >= EXACT_US:
            shift = us.bit_length() - SUB_BITS - 1
            us = (shift << SUB_BITS) + (us >> shift) if us < MAX_US else TOP_BUCKET
        elif us < 0:  # (clocks that are not the loop's)
            us = 0
        self.counts[us] += count

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def sum_us(self) -> float:
        """The sum of the values, each taken as its bucket's middle."""
        total = 0.0
        for index, n in enumerate(self.counts):
            if n:
                lo, hi = bucket_range(index)
                total += n * (lo + hi - 1) / 2
        return total

    @property
    def max_us(self) -> int:
        for index in range(_SIZE - 1, -1, -1):
            if self.counts[index]:
                return bucket_range(index)[1] - 1
        return 0

    def percentile(self, pct: float, count: int | None = None) -> float:
        """The value (µs) at or below which ``pct`` % of the values lie (0 when empty):
        the top of the bucket it falls in (HdrHistogram's "highest equivalent value")."""
        count = self.count if count is None else count
        if not count:
            return 0.0
        rank = max(1, -(-count * pct // 100))
        seen = 0
        for index, n in enumerate(self.counts):
            if n:
                seen += n
                if seen >= rank:
                    return float(bucket_range(index)[1] - 1)
        return float(self.max_us)

    def summary(self) -> dict[str, float]:
        count = self.count
        out: dict[str, float] = {"count": count}
        for name, pct in PERCENTILES:
            out[name] = self.percentile(pct, count)
        out["max_us"] = float(self.max_us)
        return out

    def sparse(self) -> dict[str, int]:
        """What a worker hands on: the non-empty buckets."""
        return {str(i): n for i, n in enumerate(self.counts) if n}

    def merge_sparse(self, data: dict[str, Any]) -> None:
        for index, n in data.items():
            i = int(index)
            if 0 <= i < _SIZE:
                self.counts[i] += int(n)

    def coarse(self) -> list[tuple[float, int]]:
        """Cumulative counts per ``COARSE_BUCKETS`` bound (a fine bucket counts under
        the first bound at or above its highest value: never faster than it was)."""
        out = []
        cumulative = 0
        index = 0
        counts = self.counts
        for le in COARSE_BUCKETS:
            le_us = round(le * 1e6)
            while index < _SIZE and bucket_range(index)[1] - 1 <= le_us:
                cumulative += counts[index]
                index += 1
            out.append((le, cumulative))
        return out


class ExecCounts:
    """The exec handler's commands (it counts; the stats read)."""

    __slots__ = ("finished", "queued", "running", "started")

    def __init__(self) -> None:
        self.started = 0
        self.running = 0
        self.queued = 0
        self.finished = dict.fromkeys(
            ("exit_0", "nonzero", "signal", "timeout", "truncated", "refused"), 0)

    def as_dict(self) -> dict[str, Any]:
        return {"started": self.started, "running": self.running, "queued": self.queued,
                "finished": dict(self.finished)}


#: One process runs one server: the exec handler counts here.
EXEC: Final = ExecCounts()

#: Close reasons every /stats shows, even at 0 (others appear once they happen).
CLOSE_REASONS: Final = ("eof", "reset", "idle", "frame_too_large", "frame_timeout",
                        "max_output", "output_soft", "max_buffered", "drain", "error")
REFUSE_REASONS: Final = ("max_conns", "per_ip", "protected", "lockout", "proxy_from")


class Stats:
    """A server's counters; the per-connection ones are summed in ``snapshot``."""

    def __init__(self, handler: str, options: dict[str, Any], version: str) -> None:
        self.started = time.monotonic()
        self.handler = handler
        self.options = options
        self.version = version
        self.accepted = 0
        self.peak = 0
        self.refused = dict.fromkeys(REFUSE_REASONS, 0)
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.handler_errors = 0
        self.pauses = 0
        self.emfile = 0
        self.admin_accepted = 0
        self.admin_current = 0
        self.admin_refused = 0
        # What closed connections had counted: bytes in, out, messages in, out.
        self.retired = [0, 0, 0, 0]
        self.latency = Histogram()

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def retire(self, reason: str, counts: tuple[int, int, int, int]) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1
        retired = self.retired
        for i, n in enumerate(counts):
            retired[i] += n

    def snapshot(self, conns: Iterable[Any], draining: bool = False,
                 fine: bool = False) -> dict[str, Any]:
        """The /stats object (``fine``: with the histogram's buckets, for a supervisor)."""
        bin_, bout, min_, mout = self.retired
        current = pending = buffered = 0
        for conn in conns:
            current += 1
            c_in, c_out, m_in, m_out = conn.counts()
            bin_ += c_in
            bout += c_out
            min_ += m_in
            mout += m_out
            pending += conn.pending
            buffered += conn.buffered_input
        latency = self.latency
        out: dict[str, Any] = {
            "version": self.version,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "options": self.options,
            "draining": draining,
            "connections": {"accepted": self.accepted, "current": current,
                            "peak": max(self.peak, current), "refused": dict(self.refused),
                            "closed": dict(self.closed)},
            "messages": {"in": min_, "out": mout},
            "bytes": {"in": bin_, "out": bout},
            "handler_errors": self.handler_errors,
            "flow_control_pauses": self.pauses,
            "pending_output_bytes": pending,
            "buffered_input_bytes": buffered,
            "emfile_episodes": self.emfile,
            "exec": EXEC.as_dict(),
            "latency": {self.handler: latency.summary()},
            "admin": {"accepted": self.admin_accepted, "current": self.admin_current,
                      "refused": self.admin_refused},
        }
        if fine:
            out["histograms"] = {self.handler: latency.sparse()}
        return out


#: Gauges: a dead worker's are 0 in the sums (its counters stay).
_GAUGES: Final = frozenset({"current", "running", "queued", "pending_output_bytes",
                            "buffered_input_bytes"})


def _add(into: dict[str, Any], part: dict[str, Any], alive: bool) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value, alive)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            into.setdefault(key, value)
        elif key in _GAUGES and not alive:
            into.setdefault(key, 0)
        elif key == "peak":
            into[key] = into.get(key, 0) + value  # (the sum of the peaks: an upper bound)
        else:
            into[key] = into.get(key, 0) + value


def merge_snapshots(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """One /stats from the workers' fine snapshots (each with "worker", "pid", "alive")."""
    total: dict[str, Any] = {}
    hists: dict[str, Histogram] = {}
    detail = []
    for snap in workers:
        alive = bool(snap.get("alive"))
        body = {k: v for k, v in snap.items()
                if k not in ("histograms", "latency", "worker", "pid", "alive", "options",
                             "version", "uptime_seconds", "draining")}
        _add(total, body, alive)
        for name, data in snap.get("histograms", {}).items():
            hists.setdefault(name, Histogram()).merge_sparse(data)
        detail.append({k: v for k, v in snap.items() if k != "histograms"})
    first = workers[0] if workers else {}
    out: dict[str, Any] = {"version": first.get("version", ""),
                           "uptime_seconds": max((w.get("uptime_seconds", 0) for w in workers),
                                                 default=0),
                           "options": first.get("options", {}),
                           "draining": any(w.get("draining") for w in workers if w.get("alive"))}
    out.update(total)
    out["latency"] = {name: h.summary() for name, h in hists.items()}
    out["histograms"] = hists  # (the renderer's; taken out before JSON)
    out["workers"] = detail
    return out
