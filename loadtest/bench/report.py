"""From raw runs to the report: medians, ratios to the C server and uvloop, targets.

The idea: every figure in the report is the median of the repeats of one
(server, scenario) pair, and every ratio divides two medians from the same
invocation, so a noisy neighbour moves numerator and denominator alike.  A
pair with any failed run (a reply that did not verify, a dropped connection,
a crash) is shown as failed, never as a number.  Nothing here does I/O
except `write_markdown`.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenarios import Scenario

C_SERVER = "c-epoll"
UVLOOP = "uvloop-protocol"
UVLOOP_TLS = "uvloop-protocol-tls"
MUXSRV_TLS = "muxsrv-tls"
MUXSRV_AUTH = "muxsrv-auth"
MUXSRV_SECURED = (MUXSRV_TLS, MUXSRV_AUTH)
#: An authenticated connection pays nothing per message: within the noise of a
#: one-run ratio on a quiet machine (the plaintext path's own budget is 3%).
AUTH_NEED = 0.97
Runs = dict[str, dict[str, list[dict[str, Any]]]]  # server -> scenario key -> results


@dataclass
class Cell:
    """The median of one (server, scenario) pair, or why there is none."""

    value: float | None = None
    p50: float | None = None
    p99: float | None = None
    server_cpu: float | None = None
    gen_cpu: float | None = None
    spare: float | None = None  # share of the measured time the generator found nothing to do
    background: float | None = None  # CPUs used by other processes meanwhile
    disturbed: int = 0  # kept runs that were still disturbed after their retries
    runs: int = 0
    failed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.value is not None and self.failed == 0


def _median(results: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: Runs) -> dict[str, dict[str, Cell]]:
    table: dict[str, dict[str, Cell]] = {}
    for server, by_scenario in runs.items():
        for key, results in by_scenario.items():
            good = [r for r in results if r.get("ok")]
            cell = Cell(runs=len(results), failed=len(results) - len(good))
            for r in results:
                if not r.get("ok"):
                    cell.notes.append(describe_failure(r))
            if good and not cell.failed:
                cell.value = _median(good, "value")
                cell.p50, cell.p99 = _median(good, "p50_us"), _median(good, "p99_us")
                cell.server_cpu = _median(good, "server_cpu")
                cell.gen_cpu = _median(good, "gen_cpu")
                cell.spare = _median(good, "spare")
                cell.background = _median(good, "background")
                cell.disturbed = sum(1 for r in good if r.get("disturbed"))
            table.setdefault(server, {})[key] = cell
    return table


def describe_failure(r: dict[str, Any]) -> str:
    if "exception" in r:
        return str(r["exception"])
    parts = [
        f"{k}={r[k]}"
        for k in ("failed", "closed", "error_frames", "mismatches", "undrained")
        if r.get(k)
    ]
    if "answered" in r:
        held = r.get("established", r.get("held"))
        parts.append(f"{r['answered']} of {held} answered")
    if r.get("first_error"):
        parts.append(f"first error: {r['first_error']}")
    return ", ".join(parts) or "failed"


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "req/s":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    if unit == "GB/s":
        return f"{value:.2f}"
    return f"{value:,.0f}"


def ratio(table: dict[str, dict[str, Cell]], server: str, base: str, key: str) -> float | None:
    a, b = table.get(server, {}).get(key), table.get(base, {}).get(key)
    if a is None or b is None or not a.ok or not b.ok or not b.value or a.value is None:
        return None
    return a.value / b.value


def noisy(cell: Cell) -> bool:
    """Most of the runs behind this median were disturbed even after retries."""
    return cell.disturbed * 2 > cell.runs


def _cell_text(cell: Cell | None, unit: str) -> str:
    if cell is None:
        return ""
    if cell.failed:
        return f"FAILED ({cell.failed}/{cell.runs})"
    return fmt_value(cell.value, unit) + (" *" if noisy(cell) else "")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(first: str, titles: Sequence[str]) -> list[str]:
    return [_row([first, *titles]), _row(["---", *["---:"] * len(titles)])]


def values_table(
    table: dict[str, dict[str, Cell]], servers: Sequence[str], scs: Sequence[Scenario]
) -> list[str]:
    lines = _header("server", [f"{s.title} ({s.unit})" for s in scs])
    for name in servers:
        cells = table.get(name, {})
        lines.append(_row([name, *[_cell_text(cells.get(s.key), s.unit) for s in scs]]))
    return lines


def ratio_table(
    table: dict[str, dict[str, Cell]], servers: Sequence[str], scs: Sequence[Scenario], base: str
) -> list[str]:
    lines = _header("server", [s.title for s in scs])
    for name in servers:
        texts = []
        for s in scs:
            r = ratio(table, name, base, s.key)
            texts.append("" if r is None else f"{r:.2f}x")
        lines.append(_row([name, *texts]))
    return lines


def cpu_cost(cell: Cell | None, unit: str) -> float | None:
    """The server's CPU time per request in us (per MB of payload for GB/s), or None."""
    if cell is None or not cell.ok or not cell.value or cell.server_cpu is None:
        return None
    per_second = cell.value * 1e3 if unit == "GB/s" else cell.value  # MB/s or req/s
    return cell.server_cpu / per_second * 1e6


def cost_table(
    table: dict[str, dict[str, Cell]], servers: Sequence[str], scs: Sequence[Scenario]
) -> list[str]:
    """Server CPU per request: on a shared machine, steadier than throughput (a
    neighbour takes the server's CPU away, and with it req/s, more than it changes
    what each request costs)."""
    load = [s for s in scs if s.kind == "load"]
    units = {"req/s": "us/req", "GB/s": "us/MB"}
    lines = _header("server", [f"{s.title} ({units.get(s.unit, '')})" for s in load])
    for name in servers:
        texts = []
        for s in load:
            cost = cpu_cost(table.get(name, {}).get(s.key), s.unit)
            texts.append("" if cost is None else f"{cost:,.2f}" if cost < 100 else f"{cost:,.0f}")
        lines.append(_row([name, *texts]))
    return lines


def latency_table(
    table: dict[str, dict[str, Cell]], servers: Sequence[str], scs: Sequence[Scenario]
) -> list[str]:
    load = [s for s in scs if s.kind == "load"]
    lines = _header("server", [f"{s.title} p50 / p99" for s in load])
    for name in servers:
        texts = []
        for s in load:
            c = table.get(name, {}).get(s.key)
            if c is not None and c.ok and c.p50 is not None and c.p99 is not None:
                texts.append(f"{c.p50:,.0f} / {c.p99:,.0f}")
            else:
                texts.append("")
        lines.append(_row([name, *texts]))
    return lines


def headroom_table(table: dict[str, dict[str, Cell]], scs: Sequence[Scenario]) -> list[str]:
    """Is the generator the bottleneck?  C server vs the fastest Python server."""
    titles = ["C server", "fastest Python server", "C / fastest", "generator idle, C run",
              "generator idle, fastest Python run", "C server CPU"]  # fmt: skip
    lines = _header("scenario", titles)
    for s in scs:
        c = table.get(C_SERVER, {}).get(s.key)
        if s.kind != "load" or c is None or not c.ok or c.value is None:
            continue
        py = [(cells[s.key], name) for name, cells in table.items()
              if name != C_SERVER and s.key in cells and cells[s.key].ok]  # fmt: skip
        best, best_name = max(py, key=lambda p: p[0].value or 0.0, default=(None, ""))
        best_value = best.value if best is not None else None
        lines.append(_row([
            s.title, fmt_value(c.value, s.unit),
            f"{fmt_value(best_value, s.unit)} ({best_name})" if best_value else "",
            f"{c.value / best_value:.2f}x" if best_value else "",
            _pct(c.spare), _pct(best.spare if best else None), _pct(c.server_cpu),
        ]))  # fmt: skip
    return lines


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}"


@dataclass(frozen=True)
class Target:
    what: str
    need: str
    measured: str
    passed: bool | None  # None: could not be measured in this run
    shaky: bool = False  # rests on a median most of whose runs were disturbed


def _shaky(table: dict[str, dict[str, Cell]], key: str, *names: str) -> bool:
    return any(noisy(c) for n in names if (c := table.get(n, {}).get(key)) is not None)


def _vs(
    table: dict[str, dict[str, Cell]], key: str, base: str, need: float, what: str,
    server: str = "muxsrv",
) -> Target:  # fmt: skip
    r = ratio(table, server, base, key)
    return Target(
        what,
        f">= {need:.2f}x {base}",
        "n/a" if r is None else f"{r:.2f}x",
        None if r is None else r >= need,
        _shaky(table, key, server, base),
    )


def secured_targets(table: dict[str, dict[str, Cell]], scs: Sequence[Scenario]) -> list[Target]:
    """Issue 10's: muxsrv over TLS >= uvloop over TLS on each scenario; AUTH costs nothing."""
    out: list[Target] = []
    if MUXSRV_TLS in table or UVLOOP_TLS in table:
        for s in scs:
            if s.kind == "load":
                what = f"TLS: {MUXSRV_TLS}, {s.title} {s.unit}"
                out.append(_vs(table, s.key, UVLOOP_TLS, 1.0, what, MUXSRV_TLS))
    if MUXSRV_AUTH in table:
        known = [(r, s.title, s.key) for s in scs if s.kind == "load"
                 if (r := ratio(table, MUXSRV_AUTH, "muxsrv", s.key)) is not None]  # fmt: skip
        worst = min(known, default=None)
        out.append(Target(
            "authenticated connections vs plain muxsrv (worst case)",
            f">= {AUTH_NEED:.2f}x muxsrv (about 1.0)",
            "n/a" if worst is None else f"{worst[0]:.2f}x ({worst[1]})",
            None if worst is None else worst[0] >= AUTH_NEED,
            worst is not None and _shaky(table, worst[2], "muxsrv", MUXSRV_AUTH),
        ))  # fmt: skip
    return out


def targets(table: dict[str, dict[str, Cell]], scs: Sequence[Scenario]) -> list[Target]:
    """muxsrv's performance targets, each judged from one run's medians."""
    titles = {s.key: s.title for s in scs}
    out: list[Target] = []
    for key in ("rr100", "rr1k"):
        if key in titles:
            out.append(_vs(table, key, UVLOOP, 1.15, f"{titles[key]} req/s"))
            out.append(_vs(table, key, "asyncio-protocol", 1.30, f"{titles[key]} req/s"))
    if "pipe" in titles:
        t = _vs(table, "pipe", UVLOOP, 1.5, f"{titles['pipe']} req/s")
        c = ratio(table, "muxsrv", C_SERVER, "pipe")
        extra = "" if c is None else f" ({c:.2f}x C; about 0.65x C expected)"
        out.append(dataclasses.replace(t, measured=t.measured + extra))
    if "bulk" in titles:
        out.append(_vs(table, "bulk", C_SERVER, 0.85, f"{titles['bulk']} GB/s"))
    if "idle" in titles:
        idle = table.get("muxsrv", {}).get("idle")
        value = idle.value if idle is not None and idle.ok else None
        out.append(Target(
            "idle connections: server memory each", "<= 600 B",
            "n/a" if value is None else f"{value:,.0f} B",
            None if value is None else value <= 600,
        ))  # fmt: skip
    if "rr1k" in titles:
        mux, uv = table.get("muxsrv", {}).get("rr1k"), table.get(UVLOOP, {}).get("rr1k")
        what = "p99 latency at 1,000 conns"
        if mux and uv and mux.ok and uv.ok and mux.p99 and uv.p99:
            out.append(Target(
                what, f"<= {UVLOOP} ({uv.p99:,.0f} us)", f"{mux.p99:,.0f} us",
                mux.p99 <= uv.p99, _shaky(table, "rr1k", "muxsrv", UVLOOP),
            ))  # fmt: skip
        else:
            out.append(Target(what, f"<= {UVLOOP}", "n/a", None))
    small = [s for s in scs if s.small]
    if small:
        known = [
            (r, s.title, s.key)
            for s in small
            if (r := ratio(table, "muxsrv-upper", "muxsrv", s.key)) is not None
        ]
        worst = min(known, default=None)
        out.append(Target(
            "`upper` handler vs `echo`, small messages (worst case)", ">= 0.90x echo",
            "n/a" if worst is None else f"{worst[0]:.2f}x ({worst[1]})",
            None if worst is None else worst[0] >= 0.90,
            worst is not None and _shaky(table, worst[2], "muxsrv", "muxsrv-upper"),
        ))  # fmt: skip
    return out + secured_targets(table, scs)


def targets_table(rows: Sequence[Target]) -> list[str]:
    lines = [_row(["target", "needed", "measured", "result"]), _row(["---"] * 4)]
    for t in rows:
        verdict = "n/a" if t.passed is None else ("PASS" if t.passed else "FAIL")
        lines.append(_row([t.what, t.need, t.measured, verdict + (" *" if t.shaky else "")]))
    return lines


def write_markdown(path: Path, sections: Sequence[tuple[str, Sequence[str]]], title: str) -> str:
    parts = [f"# {title}", ""]
    for heading, lines in sections:
        parts += [f"## {heading}", "", *lines, ""]
    text = "\n".join(parts)
    path.write_text(text)
    return text
