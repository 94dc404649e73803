"""Side-by-side benchmark: muxsrv against its peers and a C limit, one command.

The idea: start each server (muxsrv and peers serving the same length-prefixed
echo in their own idiom) pinned to one CPU, drive it from the other CPU with a
C load generator that verifies every reply byte for byte, repeat, and report
medians and ratios to the C server and to uvloop from the same run, plus a
pass/fail line for each of muxsrv's performance targets.

    python loadtest/bench/run.py                  # all servers and scenarios, 6-8 minutes
    python loadtest/bench/run.py --max-conns      # ... plus max-conns (about +2 minutes)
    python loadtest/bench/run.py --quick          # one short repeat, for iterating
    python loadtest/bench/run.py --servers muxsrv,uvloop-protocol --scenarios rr100,pipe
    python loadtest/bench/run.py --max-conns --write-results   # replace the committed results
    python loadtest/bench/run.py --tls            # TLS and AUTH: rr100, pipe, bulk (about 3 min)

Writes latest.md, latest.json and latest.png (no chart without matplotlib)
into a new folder under runs/, which git ignores, and prints where; only
--write-results rewrites the committed ones in results/ (see outdir.py).
Load repeats are interleaved (repeat 1 of every server, then repeat 2, ...)
with a fresh server process each time; idle and max-conns run once per server.
The TLS servers' certificate and the token file are made for the run in a
private temporary folder (tlsfiles.py) and removed when it ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cbuild
import chart
import cpuload
import machine
import outdir
import report
import scenarios
import servers
import tlsfiles
from scenarios import SCENARIOS, Scenario, Settings
from servers import SERVERS, ServerSpec

sys.path.insert(0, str(servers.ROOT))  # so that the "muxsrv" spec finds its package
QUICK = {"repeats": 1, "warmup": 0.3, "duration": 1.0, "idle_conns": 2000}
TLS_SCENARIOS = ("rr100", "pipe", "bulk")  # issue 10's three
NO_CHART = "no chart drawn (matplotlib is not installed)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repeat of 1 s, 2,000 idle conns")
    p.add_argument(
        "--servers",
        help=f"comma list (default all but c-epoll-blocking): {','.join(servers.NAMES)}",
    )
    p.add_argument("--scenarios", help=f"comma list (default all): {','.join(scenarios.KEYS)}")
    p.add_argument(
        "--tls",
        action="store_true",
        help=f"TLS and tokens: servers (unless --servers) {','.join(servers.TLS_NAMES)}; "
        f"scenarios (unless --scenarios) {','.join(TLS_SCENARIOS)}",
    )
    p.add_argument("--repeats", type=int, default=3, help="load repeats, median reported")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    p.add_argument("--duration", type=float, default=1.5, help="seconds measured per run")
    p.add_argument("--idle-conns", type=int, default=10_000)
    p.add_argument(
        "--max-conns",
        action="store_true",
        help="also run the slow max-conns scenario (as does naming it in --scenarios)",
    )
    p.add_argument(
        "--max-conns-cap",
        type=int,
        default=100_000,
        help="the max-conns scenario stops here",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=3.0,
        help="before each load run, wait up to this long for other processes to go quiet",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="run a disturbed load scenario again, up to this many times; keep the best",
    )
    p.add_argument(
        "--gen-poll",
        choices=scenarios.POLL_MODES,
        default="yield",
        help="how the generator waits: block in epoll_wait, spin, or spin and sched_yield",
    )
    outdir.add_arguments(p, "latest.{md,json,png}")
    # --quick changes only the defaults: explicit options still win.
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    p.set_defaults(**(QUICK if quick else {}))
    return p.parse_args(argv)


def pick(
    names: str | None, known: tuple[str, ...], what: str, default: tuple[str, ...] | None = None
) -> list[str]:
    if not names:
        return list(known if default is None else default)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return [n for n in known if n in chosen]


def draw_chart(
    path: Path, table: dict[str, dict[str, report.Cell]], names: list[str],
    scs: list[Scenario], subtitle: str,
) -> str | None:  # fmt: skip
    """Draw the PNG at `path`: None if drawn, else the line saying that none was."""
    if chart.draw(path, table, names, scs, subtitle):
        return None
    why = NO_CHART
    if path.exists():  # this run's tables beside an older run's chart
        why += f"; the {path.name} there is from an earlier run"
    return why


@dataclasses.dataclass
class Written:
    """What `Bench.write` left, and where."""

    text: str  # the report, as written to latest.md
    clean: bool  # no reply failed verification and no server failed
    out: Path
    files: list[str]  # names in `out`
    no_chart: str | None  # why there is no PNG, or None

    def where(self) -> list[str]:
        """The closing lines: which files are in which folder, and any missing chart."""
        lines = [f"wrote {', '.join(self.files)} in {self.out}"]
        return [*lines, self.no_chart] if self.no_chart else lines


def raise_nofile() -> None:
    """Soft limit to the hard one, here and (inherited) in every server and generator."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def choose_cpus() -> tuple[int | None, int | None]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[-1], cpus[0]) if len(cpus) >= 2 else (None, None)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server_cpu, gen_cpu = choose_cpus()
        self.settings = Settings(
            warmup=args.warmup,
            duration=args.duration,
            gen_cpu=gen_cpu,
            max_cap=args.max_conns_cap,
            quiet_wait=args.quiet_wait,
            gen_poll=args.gen_poll,
        )
        wanted = pick(args.scenarios, scenarios.KEYS, "scenarios",
                      TLS_SCENARIOS if args.tls else None)  # fmt: skip
        if not args.max_conns and "maxconns" not in (args.scenarios or ""):
            wanted = [k for k in wanted if k != "maxconns"]
        self.scenarios = [
            dataclasses.replace(s, conns=args.idle_conns, title=f"{args.idle_conns:,} idle")
            if s.key == "idle"
            else s
            for s in SCENARIOS
            if s.key in wanted
        ]
        self.notes: list[str] = []
        self.specs: list[ServerSpec] = []
        default_names = servers.TLS_NAMES if args.tls else servers.DEFAULT_NAMES
        for name in pick(args.servers, servers.NAMES, "servers", default_names):
            spec = next(s for s in SERVERS if s.name == name)
            why = spec.missing()
            if why:
                self.notes.append(f"{name}: skipped, {why}")
                print(f"skip {name}: {why}", flush=True)
            else:
                self.specs.append(spec)
        self.runs: report.Runs = {s.name: {} for s in self.specs}
        self.goals: list[report.Target] = []
        #: The certificate and tokens, while any server here needs them (see close).
        self.files: tlsfiles.BenchFiles | None = None

    def close(self) -> None:
        """Remove the run's certificate and token files, if any were made."""
        if self.files is not None:
            self.files.close()
            self.files = None

    def files_for(self, spec: ServerSpec) -> tlsfiles.BenchFiles | None:
        if spec.needs_files and self.files is None:
            self.files = tlsfiles.BenchFiles()
        return self.files if spec.needs_files else None

    def applies(self, spec: ServerSpec, sc: Scenario) -> bool:
        return sc.small or not spec.small_only

    def record(self, spec: ServerSpec, sc: Scenario, result: dict[str, Any], tag: str) -> None:
        self.runs[spec.name].setdefault(sc.key, []).append(result)
        if "exception" in result:
            text = f"ERROR {result['exception']}"
        elif sc.kind == "load":
            text = f"{report.fmt_value(result['value'], sc.unit)} {sc.unit}"
            text += f", p50 {result['p50_us']:,.0f} us, p99 {result['p99_us']:,.0f} us"
            text += f", server CPU {result['server_cpu']:.0%}, generator idle {result['spare']:.0%}"
            text += f", others {result['background']:.2f} CPU"
        elif sc.kind == "idle":
            text = f"{report.fmt_value(result['value'], sc.unit)} {sc.unit}"
            text += f" ({result['established']:,} held, {result['answered']:,} answered again)"
        else:
            text = f"{report.fmt_value(result['value'], sc.unit)} {sc.unit} answered"
            text += f" ({result['held']:,} held, server fds {result['server_fds']:,};"
            text += f" stopped by: {result['first_error'] or 'the cap'})"
        if not result.get("ok") and "exception" not in result:
            text += f"  FAILED: {report.describe_failure(result)}"
        print(f"[{tag}] {spec.name:22} {sc.title:20} {text}", flush=True)

    def session(self, spec: ServerSpec, scs: list[Scenario], tag: str) -> None:
        """One fresh server process for `scs`; a failure costs only the rest of this session."""
        try:
            srv = servers.start(spec, self.server_cpu, self.files_for(spec))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            for sc in scs:
                self.record(spec, sc, {"exception": f"start failed: {exc}", "ok": False}, tag)
            return
        try:
            for sc in scs:
                if not srv.alive():
                    why = f"server exited ({srv.proc.returncode}): {srv.stderr_tail()}"
                    self.record(spec, sc, {"exception": why, "ok": False}, tag)
                    continue
                self.record(spec, sc, self.attempt(srv, sc), tag)
        finally:
            status = srv.stop()
            if status not in (0, None):
                self.notes.append(f"{spec.name}: exited with status {status} after SIGTERM")

    def attempt(self, srv: servers.RunningServer, sc: Scenario) -> dict[str, Any]:
        """Run `sc`.  A load run that was disturbed (see scenarios.disturbed) is run
        again, up to --retries times, and the best attempt kept: on a shared
        machine, interference only ever makes a run slower."""
        best: dict[str, Any] | None = None
        for attempt in range(1 + (self.args.retries if sc.kind == "load" else 0)):
            try:
                result = scenarios.run(srv, sc, self.settings)
            except (RuntimeError, OSError) as exc:
                return {"exception": str(exc), "ok": False}
            result["attempts"] = attempt + 1
            if best is None or result.get("value", 0) > best.get("value", 0):
                best = result
            if not result.get("ok") or not result.get("disturbed"):
                break
            print(
                f"    (disturbed: others {result['background']:.2f} CPU, server CPU "
                f"{result['server_cpu']:.0%}, generator idle {result['spare']:.0%}: again)",
                flush=True,
            )
        assert best is not None
        return best

    def run(self) -> None:
        load = [s for s in self.scenarios if s.kind == "load"]
        for rep in range(self.args.repeats if load else 0):
            for spec in self.specs:
                mine = [s for s in load if self.applies(spec, s)]
                if mine:
                    self.session(spec, mine, f"{rep + 1}/{self.args.repeats}")
        for sc in self.scenarios:
            if sc.kind != "load":
                for spec in self.specs:
                    if self.applies(spec, sc):
                        self.session(spec, [sc], sc.key)

    def secured_notes(self, names: list[str]) -> list[str]:
        """How the TLS and token servers were driven, for the report's machine section."""
        lines = []
        specs = [s for s in self.specs if s.name in names]
        if any(s.tls for s in specs):
            results = [r for s in specs if s.tls for rs in self.runs[s.name].values() for r in rs]
            seen = sorted({r["tls"] for r in results if r.get("tls")})
            lines.append(
                "- TLS servers: a self-signed EC P-256 certificate made for the run (checked by "
                "the generator, loadgen-tls); negotiated " + (", ".join(seen) or "(unknown)")
                + "; every connection's handshake happens before the measurement; requests "
                "sent together are one SSL_write"
            )
        if any(s.auth for s in specs):
            lines.append(
                "- muxsrv-auth: --auth-token-file; every connection sends `AUTH <token>` once "
                "(pipelined with its first echo) and gets `OK`, all before the measurement"
            )
        return lines

    def write(self, started: float, argv: list[str]) -> Written:
        out = outdir.choose(self.args)
        (out / "latest.json").write_text(json.dumps({"runs": self.runs}, indent=1, default=str))
        table = report.summarize(self.runs)
        names = [s.name for s in self.specs if s.name in table]
        tls = [s.name for s in self.specs if s.name in table and s.tls]
        plain = [n for n in names if n not in tls]
        secured = [n for n in names if n in report.MUXSRV_SECURED]
        scs = self.scenarios
        goals = report.targets(table, scs)
        subtitle = f"{machine.cpu_model()}, median of {self.args.repeats}"
        no_chart = draw_chart(out / "latest.png", table, names, scs, subtitle)
        minutes = (time.monotonic() - started) / 60
        s = self.settings
        how = [
            f"- Command: `{' '.join(['python loadtest/bench/run.py', *argv])}`",
            f"- {self.args.repeats} repeat(s) of {s.warmup:g} s warm-up + {s.duration:g} s "
            f"measured per load scenario (median shown; fresh server each repeat); "
            f"64-byte lowercase ASCII payloads unless stated; max-conns cap {s.max_cap:,}; "
            f"whole run {minutes:.1f} min",
            "- Every reply verified byte for byte by the generator (upper-cased for "
            "muxsrv-upper); req/s are completed request/response pairs; GB/s is echoed "
            "payload bytes received per second; latency from send to full reply, in us",
            "- Every server runs with "
            + ", ".join(f"{k}={v}" for k, v in servers.MALLOC_ENV.items())
            + " (what muxsrv sets for itself at start; without it asyncio's 256 KiB reads "
            "are mapped and unmapped one by one)",
        ]
        how += self.secured_notes(names)
        footnote = []
        if any(report.noisy(c) for cells in table.values() for c in cells.values()):
            footnote = [
                "",
                "`*`: most runs behind this median were disturbed even after retries (other "
                f"processes used more than {cpuload.NOISY} CPU, or server and generator both "
                "stalled); treat with care.",
            ]
        sections: list[tuple[str, list[str]]] = [
            ("Machine", machine.describe(self.server_cpu, s.gen_cpu) + how),
            ("Results (median)", report.values_table(table, names, scs) + footnote),
            ("Ratio to the C epoll server (same run)",
             report.ratio_table(table, names, scs, report.C_SERVER)),
            ("Ratio to uvloop Protocol (same run)",
             report.ratio_table(table, plain, scs, report.UVLOOP)),
            *([("Ratio to uvloop Protocol over TLS (same run)",
                report.ratio_table(table, tls, scs, report.UVLOOP_TLS))] if tls else []),
            *([("TLS and tokens: ratio to plaintext muxsrv (same run)",
                report.ratio_table(table, secured, scs, "muxsrv"))] if secured else []),
            *([("Server CPU per request (median of repeats; lower is cheaper)",
                report.cost_table(table, names, scs))] if tls or secured else []),
            ("Latency, us (median of repeats)", report.latency_table(table, names, scs)),
            ("Is the generator the bottleneck?", report.headroom_table(table, scs)),
            ("Targets (muxsrv)", report.targets_table(goals)),
        ]  # fmt: skip
        held = [(n, r["maxconns"][0]) for n, r in self.runs.items() if r.get("maxconns")]
        if held:
            lines = [
                "| server | held, all answering | server fds at peak | first failure |",
                "| --- | ---: | ---: | --- |",
            ]
            for name, r in held:
                if "exception" in r:
                    lines.append(f"| {name} | | | {r['exception']} |")
                    continue
                why = r["first_error"] or f"reached the cap ({r['cap']:,})"
                lines.append(f"| {name} | {r['answered']:,} of {r['held']:,} | "
                             f"{r['server_fds']:,} | {why} |")  # fmt: skip
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            lines += ["", f"Every server process may have {soft:,} open files here; a "
                      "connection the server cannot accept waits in its backlog unanswered, "
                      "which is the first failure."]  # fmt: skip
            sections.insert(len(sections) - 1, ("Max connections", lines))  # before targets
        failures = [
            f"{name} / {key}: {'; '.join(dict.fromkeys(cell.notes))}"
            for name, cells in table.items()
            for key, cell in cells.items()
            if cell.failed
        ]
        notes = [*self.notes, *failures, *([no_chart] if no_chart else [])]
        if notes:
            sections.append(("Notes", [f"- {n}" for n in notes]))
        text = report.write_markdown(out / "latest.md", sections, "muxsrv side-by-side benchmark")
        self.goals = goals
        files = ["latest.md", "latest.json", *([] if no_chart else ["latest.png"])]
        return Written(text, not failures, out, files, no_chart)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server under test is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    raise_nofile()
    cbuild.build_all()
    bench = Bench(args)
    if not bench.specs or not bench.scenarios:
        print("nothing to run", file=sys.stderr)
        return 2
    try:
        bench.run()
    finally:
        bench.close()
    written = bench.write(started, argv)
    print()
    print(written.text)
    print("\ntargets:")
    for t in bench.goals:
        verdict = "n/a " if t.passed is None else ("PASS" if t.passed else "FAIL")
        shaky = "  (disturbed: rerun)" if t.shaky else ""
        print(f"  {verdict}  {t.what}: {t.measured} (needed {t.need}){shaky}", flush=True)
    print()
    print("\n".join(written.where()), flush=True)  # last, where it is seen
    return 0 if written.clean else 1


if __name__ == "__main__":
    sys.exit(main())
