"""Scaling: muxsrv ``--workers 1`` against ``--workers 2`` (or any list), direct and behind HAProxy.

The idea: one run, one table.  Each *setup* is a muxsrv command (``--workers
N``) reached either directly or through an HAProxy in TCP mode in front of it
(``send-proxy-v2``, muxsrv with ``--proxy-protocol``: the configuration an
operator runs, so the balancer's cost includes writing the header and muxsrv's
includes parsing it).  Each setup is loaded with the bench's C generator
(``build/loadgen``, every reply checked byte for byte) in each scenario, a
fresh server (and balancer) for every repeat, repeats interleaved across
setups; the table shows medians of requests per second, the p99 latency, and
the CPU the serving side used (muxsrv's processes and HAProxy's, summed: 1.0
is one CPU busy), then the ratios the question is about: N workers against
one, and behind HAProxy against direct.

Nothing is pinned: with ``--workers 2`` on a two-CPU machine, muxsrv needs
both CPUs and the generator (and HAProxy) share them, so the figures here say
more about the cost of each piece than about scaling; run it on a bigger
machine, with the generator on another one (``--generator``, ``--listen``,
``--connect``: see README.md) for the scaling itself.  Exit status 1 if any
run failed or a reply did not verify.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbuild
from scenarios import LOADGEN, SCENARIOS, Scenario
from servers import CLOCK_TICKS, LISTEN_RE, MALLOC_ENV, ROOT

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
HAPROXY_CFG = """\
global
    maxconn {maxconn}
    nbthread {threads}

defaults
    mode tcp
    timeout connect 5s
    timeout client  60s
    timeout server  60s

frontend bench_in
    bind {listen}:{port}
    default_backend bench_muxsrv

backend bench_muxsrv
    server muxsrv 127.0.0.1:{backend} send-proxy-v2
"""


@dataclass(frozen=True)
class Setup:
    workers: int
    haproxy: bool

    @property
    def name(self) -> str:
        via = "haproxy -> muxsrv" if self.haproxy else "muxsrv direct"
        return f"{via} --workers {self.workers}"


@dataclass
class Cell:
    rps: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self, values: list[float]) -> float | None:
        return statistics.median(values) if values else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="worker counts to compare (default: 1,2)")
    p.add_argument("--scenarios", default="rr100,pipe",
                   help="load scenarios of run.py (default: rr100,pipe)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds (default: 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before (default: 1)")
    p.add_argument("--repeats", type=int, default=3, help="fresh servers per cell (default: 3)")
    p.add_argument("--no-haproxy", action="store_true", help="only the direct setups")
    p.add_argument("--haproxy-threads", type=int, default=1,
                   help="HAProxy's nbthread (default: 1; on a bigger machine, more)")
    p.add_argument("--listen", default="127.0.0.1",
                   help="address muxsrv (direct) and HAProxy listen on (default: 127.0.0.1; "
                        "another address means --no-protected-mode: use a private network)")
    p.add_argument("--connect", default=None,
                   help="IPv4 address the generator connects to (default: --listen)")
    p.add_argument("--generator", default=None,
                   help="command that runs loadgen, e.g. 'ssh loadhost /opt/muxsrv/loadgen' "
                        "(default: the local build/loadgen)")
    p.add_argument("--json", type=Path, default=None, help="also write every run to this file")
    args = p.parse_args(argv)
    args.worker_counts = [int(n) for n in args.workers.split(",")]
    keys = {s.key: s for s in SCENARIOS if s.kind == "load"}
    unknown = [k for k in args.scenarios.split(",") if k not in keys]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {', '.join(keys)}")
    args.scenario_list = [keys[k] for k in args.scenarios.split(",")]
    return args


def free_port(host: str) -> int:
    """A port free right now (HAProxy cannot be asked for port 0 and say which it got)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the supervisor and its workers)."""
    total = 0.0
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except (OSError, ValueError):
                continue
    for each in pids:
        try:
            with open(f"/proc/{each}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except OSError:
            continue
    return total


class Served:
    """muxsrv (and HAProxy in front of it) for one run; stopped by PID, always reaped."""

    def __init__(self, setup: Setup, args: argparse.Namespace, tmp: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.lines: list[str] = []
        host = "127.0.0.1" if setup.haproxy else args.listen
        cmd = [sys.executable, "-m", "muxsrv", "--handler", "echo", "--host", host, "--port", "0",
               "--max-conns", "200000", "--idle-timeout", "0", "--drain-timeout", "1",
               "--workers", str(setup.workers), "--log-level", "warning"]
        if host not in ("127.0.0.1", "::1", "localhost"):
            cmd.append("--no-protected-mode")
        if setup.haproxy:
            cmd += ["--proxy-protocol", "--proxy-from", "127.0.0.0/8"]
        env = {**os.environ, **MALLOC_ENV, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.muxsrv = self._start(cmd, env)
        self.port = self._wait_listening(setup.workers)
        if setup.haproxy:
            port = free_port(args.listen)
            cfg = tmp / f"haproxy-{os.getpid()}-{port}.cfg"
            # Two descriptors a connection: within the hard limit (HAProxy raises its own).
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            maxconn = max(1000, min(100_000, (hard - 200) // 2))
            cfg.write_text(HAPROXY_CFG.format(threads=args.haproxy_threads, listen=args.listen,
                                              maxconn=maxconn,
                                              port=port, backend=self.port))
            self.haproxy: subprocess.Popen[bytes] | None = self._start(
                ["haproxy", "-db", "-f", str(cfg)], env)
            self.port = port
            self._wait_accepting(args.listen, port)
        else:
            self.haproxy = None

    def _start(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env, cwd=ROOT)
        self.procs.append(proc)
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        return proc

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def _wait_listening(self, workers: int) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = [m for line in list(self.lines) if (m := LISTEN_RE.search(line))]
            if len(found) >= workers:
                time.sleep(0.2)  # lazy start-up work done before anything is measured
                return int(found[0].group(2))
            if self.muxsrv.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"muxsrv did not start: {' | '.join(self.lines[-5:])}")

    def _wait_accepting(self, host: str, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, port), timeout=1).close()
                return
            except OSError:
                if self.haproxy is not None and self.haproxy.poll() is not None:
                    break
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"haproxy did not start: {' | '.join(self.lines[-5:])}")

    def cpu(self) -> float:
        return sum(tree_cpu(proc.pid) for proc in self.procs if proc.poll() is None)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def generate(args: argparse.Namespace, served: Served, sc: Scenario) -> dict[str, Any]:
    """One loadgen run; the serving side's CPU sampled at its measure-start and -end lines."""
    prefix = shlex.split(args.generator) if args.generator else [str(LOADGEN)]
    cmd = [*prefix, "--host", args.connect or args.listen, "--port", str(served.port),
           "--conns", str(sc.conns), "--depth", str(sc.depth), "--size", str(sc.size),
           "--warmup", str(args.warmup), "--duration", str(args.duration)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(60 + args.warmup + args.duration, proc.kill)
    timer.start()
    marks: dict[str, tuple[float, float]] = {}
    result: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            item = json.loads(line)
            if item.get("phase") in ("measure-start", "measure-end"):
                marks[item["phase"]] = (time.monotonic(), served.cpu())
            elif item.get("phase") == "done":
                result = item
        status = proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not result or len(marks) < 2:
        raise RuntimeError(f"loadgen ended early (status {status}): {err.strip()[:300]}")
    (t0, c0), (t1, c1) = marks["measure-start"], marks["measure-end"]
    result["serving_cpu"] = (c1 - c0) / (t1 - t0)
    result["ok"] = status == 0
    return result


def run(args: argparse.Namespace) -> tuple[dict[tuple[Setup, str], Cell], list[dict[str, Any]]]:
    setups = [Setup(n, False) for n in args.worker_counts]
    if not args.no_haproxy:
        setups += [Setup(n, True) for n in args.worker_counts]
    cells = {(setup, sc.key): Cell() for setup in setups for sc in args.scenario_list}
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="muxsrv-scaling-") as tmp:
        for repeat in range(args.repeats):
            for sc in args.scenario_list:
                for setup in setups:
                    cell = cells[(setup, sc.key)]
                    served = None
                    try:
                        served = Served(setup, args, Path(tmp))
                        result = generate(args, served, sc)
                    except RuntimeError as exc:
                        cell.failures.append(str(exc))
                        continue
                    finally:
                        if served is not None:
                            served.stop()
                    raw.append({"setup": setup.name, "scenario": sc.key, "repeat": repeat,
                                **result})
                    if not result["ok"]:
                        cell.failures.append(f"verification failed: {result.get('first_error')}")
                        continue
                    cell.rps.append(result["rps"])
                    cell.p99_us.append(result["p99_us"])
                    cell.cpu.append(result["serving_cpu"])
    return cells, raw


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(args: argparse.Namespace, cells: dict[tuple[Setup, str], Cell]) -> list[str]:
    """The Markdown table, one row per setup, three columns per scenario, then the ratios."""
    setups = list(dict.fromkeys(setup for setup, _ in cells))
    head = ["setup"]
    for sc in args.scenario_list:
        head += [f"{sc.key} req/s", f"{sc.key} p99 ms", f"{sc.key} CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setup in setups:
        row = [setup.name]
        for sc in args.scenario_list:
            cell = cells[(setup, sc.key)]
            p99 = cell.median(cell.p99_us)
            row += [_fmt(cell.median(cell.rps), ",.0f") + ("!" if cell.failures else ""),
                    _fmt(None if p99 is None else p99 / 1000, ".2f"),
                    _fmt(cell.median(cell.cpu), ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    base_n = args.worker_counts[0]
    for sc in args.scenario_list:
        def rps(setup: Setup, key: str = sc.key) -> float | None:
            cell = cells.get((setup, key))
            return cell.median(cell.rps) if cell is not None else None
        ratios = []
        for haproxy in ([False] if args.no_haproxy else [False, True]):
            base = rps(Setup(base_n, haproxy))
            for n in args.worker_counts[1:]:
                value = rps(Setup(n, haproxy))
                if base and value:
                    where = "behind haproxy" if haproxy else "direct"
                    ratios.append(f"--workers {n} / --workers {base_n} {where}: "
                                  f"{value / base:.2f}x")
        if not args.no_haproxy:
            for n in args.worker_counts:
                direct, behind = rps(Setup(n, False)), rps(Setup(n, True))
                if direct and behind:
                    ratios.append(f"haproxy / direct, --workers {n}: {behind / direct:.2f}x")
        lines.append(f"{sc.key} ({sc.title}): " + ("; ".join(ratios) or "no ratio"))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_haproxy and shutil.which("haproxy") is None:
        print("haproxy is not installed: only the direct setups (apt-get install haproxy)",
              file=sys.stderr)
        args.no_haproxy = True
    if args.generator is None:
        cbuild.build_all()
    cells, raw = run(args)
    cpus = len(os.sched_getaffinity(0))
    print(f"scaling: {cpus} CPUs here, nothing pinned; {args.repeats} repeat(s) of "
          f"{args.warmup:g} s warm-up + {args.duration:g} s; medians; CPU = muxsrv + haproxy, "
          "in CPUs; ! = some run failed")
    print("\n".join(table(args, cells)))
    failures = [f"{setup.name} {key}: {msg}" for (setup, key), cell in cells.items()
                for msg in cell.failures]
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
