"""The scenarios, and how one is driven against a running server with the C generator.

The idea: every scenario is one or more runs of ``build/loadgen`` pinned to the
other CPU.  The generator verifies every reply byte for byte; this module only
starts it, samples the server's CPU time at the generator's "measure-start"
and "measure-end" lines, and turns its JSON lines into one result dict.

- load scenarios: connections, requests in flight per connection, payload size;
  the result is req/s (or GB/s of echoed payload), latency percentiles, and
  how busy server and generator were while it was measured.
- idle: N connections that each answered one echo; the server's VmRSS before
  and after gives bytes per connection; then every connection must answer again.
- max: generators (one per ~RLIMIT_NOFILE connections) open connections until
  the first one fails or the cap is reached; then every held connection must
  answer one more echo.  The result is the number that did.

A TLS server is driven by ``loadgen-tls`` with ``--tls --tls-ca CERT`` (every
connection's handshake is in the connect phase, never measured), a server
with tokens gets ``--auth-token-file``: the same scenarios, the same checks.
"""

from __future__ import annotations

import json
import queue
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cpuload
from servers import BUILD, LOADGEN_TLS, RunningServer, pinned

LOADGEN = BUILD / "loadgen"
Result = dict[str, Any]
POLL_MODES = ("block", "spin", "yield")  # loadgen --spin 0, 1, 2


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    kind: str  # "load", "idle" or "max"
    conns: int = 1
    depth: int = 1
    size: int = 64  # payload bytes: small enough to be "small messages"
    unit: str = "req/s"

    @property
    def small(self) -> bool:
        return self.kind == "load" and self.size <= 1024


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("lat1", "1 conn", "load", 1),
    Scenario("rr100", "100 conns", "load", 100),
    Scenario("rr1k", "1,000 conns", "load", 1000),
    Scenario("pipe", "100 x 16 pipelined", "load", 100, depth=16),
    Scenario("bulk", "8 x 1 MiB", "load", 8, size=1 << 20, unit="GB/s"),
    Scenario("idle", "10,000 idle", "idle", 10_000, unit="B/conn"),
    Scenario("maxconns", "max conns held", "max", 100_000, unit="conns"),
)
KEYS = tuple(s.key for s in SCENARIOS)


@dataclass(frozen=True)
class Settings:
    warmup: float
    duration: float
    gen_cpu: int | None
    max_cap: int
    quiet_wait: float  # seconds to wait for a quiet machine before each load run
    gen_poll: str = "yield"  # loadgen's --spin: block (0), spin (1), yield (2)


class Generator:
    """One loadgen process; its JSON lines arrive on a queue; always reaped."""

    def __init__(
        self, args: list[str], cpu: int | None, timeout: float, binary: Path = LOADGEN
    ) -> None:
        self.proc = subprocess.Popen(
            pinned([str(binary), *args], cpu),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[Result | None] = queue.Queue()
        self.deadline = time.monotonic() + timeout
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, phase: str) -> Result:
        """The next line of `phase`; raises if the generator ends or runs out of time."""
        while True:
            left = self.deadline - time.monotonic()
            try:
                item = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                self.close()
                raise RuntimeError(f"loadgen timed out waiting for {phase!r}") from None
            if item is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                self.close()
                raise RuntimeError(f"loadgen ended before {phase!r}: {err.strip()[:300]}")
            if item.get("phase") == phase:
                return item

    def release(self) -> None:
        """Tell a holding generator to verify every connection and finish."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()

    def abort(self) -> None:
        """Kill it if it is still running, and reap it (for error paths)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> int:
        if self.proc.poll() is None and time.monotonic() > self.deadline:
            self.proc.kill()
        try:
            return self.proc.wait(max(self.deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def run_load(server: RunningServer, sc: Scenario, st: Settings) -> Result:
    args = ["--port", str(server.port), "--conns", str(sc.conns), "--depth", str(sc.depth)]
    args += ["--size", str(sc.size), "--warmup", str(st.warmup), "--duration", str(st.duration)]
    args += ["--upper"] if server.spec.upper else []
    args += ["--spin", str(POLL_MODES.index(st.gen_poll))]
    args += secure_args(server)
    background_before = cpuload.wait_quiet(st.quiet_wait)
    timeout = 60 + st.warmup + st.duration + 10
    gen = Generator(args, st.gen_cpu, timeout, binary=generator_for(server))
    try:
        gen.next("measure-start")
        t0, cpu0, busy0 = time.monotonic(), server.cpu_seconds(), cpuload.busy_seconds()
        gen.next("measure-end")
        t1, cpu1, busy1 = time.monotonic(), server.cpu_seconds(), cpuload.busy_seconds()
        result = gen.next("done")
        status = gen.close()
    finally:
        gen.abort()
    result["server_cpu"] = (cpu1 - cpu0) / (t1 - t0)
    result["gen_cpu"] = result["cpu_s"] / result["elapsed"]
    # Everything else that ran meanwhile, in CPUs (0.5: half of one CPU).
    others = (busy1 - busy0) - (cpu1 - cpu0) - result["cpu_s"]
    result["background"] = max(0.0, others / (t1 - t0))
    result["background_before"] = background_before
    result["disturbed"] = disturbed(sc, result)
    result["ok"] = status == 0 and server.alive()
    result["value"] = result["gbps"] if sc.unit == "GB/s" else result["rps"]
    return result


def generator_for(server: RunningServer) -> Path:
    return LOADGEN_TLS if server.spec.tls else LOADGEN


def secure_args(server: RunningServer) -> list[str]:
    """loadgen's TLS and token options for this server (its certificate is checked)."""
    files, args = server.files, []
    if files is not None and server.spec.tls:
        args += ["--tls", "--tls-ca", str(files.cert)]
    if files is not None and server.spec.auth:
        args += ["--auth-token-file", str(files.tokens)]
    return args


def disturbed(sc: Scenario, r: Result) -> bool:
    """Did something outside server and generator hold this run back?

    Either other processes used CPU meanwhile, or, with enough requests in
    flight to keep both busy, server and generator both sat idle a good part of
    the time: the pipeline stalled on something neither of them did (on a
    virtual machine, usually the host).
    """
    if r["background"] > cpuload.NOISY:
        return True
    in_flight = sc.conns * sc.depth
    return in_flight >= 8 and r["server_cpu"] < 0.85 and r["spare"] > 0.10


def _hold_args(server: RunningServer, conns: int, conn_timeout: float) -> list[str]:
    # Several source addresses (127.0.0.2, ...) so no one address runs out of ports.
    src = max(1, min(32, conns // 8000 + 1))
    return [
        "--mode", "hold", "--port", str(server.port), "--conns", str(conns),
        "--src", str(src), "--window", "100", "--conn-timeout", str(conn_timeout),
        "--connect-timeout", "120", "--hold-timeout", "300", *secure_args(server),
    ]  # fmt: skip


def run_idle(server: RunningServer, sc: Scenario, st: Settings) -> Result:
    conns = sc.conns
    rss0 = server.rss_bytes()
    gen = Generator(
        _hold_args(server, conns, 10.0), st.gen_cpu, timeout=300, binary=generator_for(server)
    )
    try:
        ready = gen.next("ready")
        time.sleep(0.5)  # let the server finish whatever the last connections started
        rss1, fds = server.rss_bytes(), server.open_fds()
        gen.release()
        verified = gen.next("verified")
        status = gen.close()
    finally:
        gen.abort()
    held = ready["established"]
    return {
        "conns": conns,
        "established": held,
        "answered": verified["answered"],
        "rss_before": rss0,
        "rss_after": rss1,
        "server_fds": fds,
        "value": (rss1 - rss0) / held if held else None,
        "first_error": ready["first_error"] or verified["first_error"],
        "ok": status == 0 and held == conns and verified["answered"] == held,
    }


def run_max(server: RunningServer, sc: Scenario, st: Settings) -> Result:
    """Open connections in generators of ~RLIMIT_NOFILE each until one fails or the cap."""
    per_gen = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 64
    gens: list[Generator] = []
    held, answered, errors = 0, 0, []
    try:
        while held < st.max_cap and server.alive():
            want = min(per_gen, st.max_cap - held)
            gen = Generator(_hold_args(server, want, 3.0), st.gen_cpu, timeout=420,
                            binary=generator_for(server))
            gens.append(gen)
            ready = gen.next("ready")
            held += ready["established"]
            if ready["first_error"]:
                errors.append(ready["first_error"])
            if ready["established"] < want:
                break
        fds, rss = server.open_fds(), server.rss_bytes()
        for gen in gens:
            gen.release()
        for gen in gens:
            answered += gen.next("verified")["answered"]
            gen.close()
    finally:
        for gen in gens:
            gen.abort()
    return {
        "cap": st.max_cap,
        "held": held,
        "answered": answered,
        "generators": len(gens),
        "server_fds": fds,
        "rss_at_peak": rss,
        "value": answered,
        "first_error": errors[0] if errors else "",
        "ok": answered == held and server.alive(),
    }


def run(server: RunningServer, sc: Scenario, st: Settings) -> Result:
    if sc.kind == "load":
        return run_load(server, sc, st)
    if sc.kind == "idle":
        return run_idle(server, sc, st)
    return run_max(server, sc, st)
