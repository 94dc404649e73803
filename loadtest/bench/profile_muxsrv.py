"""Where muxsrv's time goes under one benchmark scenario: py-spy samples, summed per function.

The idea: run muxsrv exactly as the benchmark does (pinned, same generator,
same scenario), let py-spy sample it from outside while the load is steady
(``--nonblocking``, so the profiler does not slow the server it measures), and
fold the stacks into two tables: self time (where the CPU is) and inclusive
time (which call paths cost).  Needs ``pip install py-spy``.

    python loadtest/bench/profile_muxsrv.py --scenario rr100 --seconds 5
    python loadtest/bench/profile_muxsrv.py --scenario pipe --handler upper
    python loadtest/bench/profile_muxsrv.py --scenario bulk --tls   # muxsrv-tls

Writes profile-<scenario>[-<handler>].md and the raw collapsed stacks next
to it (.txt, loadable by speedscope or flamegraph.pl) into a new folder under
runs/, which git ignores; --write-results replaces the committed ones in
results/, --out DIR writes anywhere (see outdir.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cbuild
import outdir
import servers
import tlsfiles
from scenarios import SCENARIOS, Generator, Scenario, generator_for, secure_args

FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """'run_once (muxsrv/loop.py:279)' -> 'run_once (muxsrv/loop.py)'."""
    m = FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    short = path.split("site-packages/")[-1].split("/lib/python3.11/")[-1]
    return f"{m.group('func')} ({short})"


Counts = collections.Counter[str]


def fold(raw: str) -> tuple[Counts, Counts, Counts, int]:
    """Self, inclusive, and muxsrv self-by-line sample counts from py-spy's raw format."""
    own: Counts = collections.Counter()
    total: Counts = collections.Counter()
    lines: Counts = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw_frames = [f.strip() for f in stack.split(";")]
        raw_frames = [f for f in raw_frames if f and not f.startswith(("process ", "thread "))]
        if not raw_frames:
            continue
        frames = [frame_name(f) for f in raw_frames]
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
        # The innermost muxsrv line: where muxsrv's own code spends (or calls out) its time.
        for frame in reversed(raw_frames):
            if "muxsrv/" in frame:
                lines[frame] += count
                break
    return own, total, lines, samples


def table(counts: collections.Counter[str], samples: int, top: int) -> list[str]:
    lines = ["| share | samples | function (file) |", "| ---: | ---: | --- |"]
    for name, n in counts.most_common(top):
        lines.append(f"| {n / samples:.1%} | {n} | `{name}` |")
    return lines


def main() -> int:
    load = [s for s in SCENARIOS if s.kind == "load"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", default="rr100", choices=[s.key for s in load])
    p.add_argument("--handler", default="echo", choices=["echo", "upper"])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--tls", action="store_true", help="profile muxsrv-tls (echo over TLS)")
    outdir.add_arguments(p, "profile-*.md and .txt")
    args = p.parse_args()
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    cbuild.build_all()
    results = outdir.choose(args)
    sc = next(s for s in load if s.key == args.scenario)
    spec = next(s for s in servers.SERVERS if s.name == "muxsrv")
    if args.handler == "upper":
        spec = next(s for s in servers.SERVERS if s.name == "muxsrv-upper")
    if args.tls:
        spec = next(s for s in servers.SERVERS if s.name == "muxsrv-tls")
    files = tlsfiles.BenchFiles() if spec.needs_files else None
    try:
        return profile(args, sc, spec, files, results)
    finally:
        if files is not None:
            files.close()


def profile(
    args: argparse.Namespace, sc: Scenario, spec: servers.ServerSpec,
    files: tlsfiles.BenchFiles | None, results: Path,
) -> int:  # fmt: skip
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, gen_cpu = (cpus[-1], cpus[0]) if len(cpus) > 1 else (None, None)
    srv = servers.start(spec, server_cpu, files)
    stem = f"profile-{sc.key}" + ("" if args.handler == "echo" else f"-{args.handler}")
    stem += "-tls" if args.tls else ""
    raw_path = results / f"{stem}.txt"
    gen_args = ["--port", str(srv.port), "--conns", str(sc.conns), "--depth", str(sc.depth)]
    gen_args += ["--size", str(sc.size), "--warmup", "0.5", "--duration", str(args.seconds + 1)]
    gen_args += ["--upper"] if spec.upper else []
    gen_args += secure_args(srv)
    gen = Generator(gen_args, gen_cpu, timeout=args.seconds + 90, binary=generator_for(srv))
    try:
        gen.next("measure-start")
        spy = ["py-spy", "record", "--pid", str(srv.pid), "--duration", str(int(args.seconds))]
        spy += ["--rate", "250", "--nonblocking", "--format", "raw", "--output", str(raw_path)]
        subprocess.run(spy, check=True, capture_output=True, timeout=args.seconds + 60)
        result = gen.next("done")
        gen.close()
    finally:
        gen.abort()
        srv.stop()
    own, total, by_line, samples = fold(raw_path.read_text())
    if not samples:
        print("py-spy collected no samples", file=sys.stderr)
        return 1
    rate = result["gbps"] if sc.unit == "GB/s" else result["rps"]
    head = [
        f"# muxsrv profile: {sc.title}, handler {args.handler}",
        "",
        f"{samples} samples over {args.seconds:g} s (py-spy, 250 Hz, non-blocking, idle "
        f"excluded); throughput while sampled: {rate:,.2f} {sc.unit}; reply check: "
        f"{'ok' if result['mismatches'] == 0 and result['failed'] == 0 else 'FAILED'}.",
        "",
        "## Self time (where the CPU is)",
        "",
        *table(own, samples, args.top),
        "",
        "## Inclusive time (what each call costs with everything it calls)",
        "",
        *table(total, samples, args.top),
        "",
        "## Innermost muxsrv line (self time of a line, plus what it calls outside muxsrv)",
        "",
        *table(by_line, samples, args.top),
        "",
    ]
    out = results / f"{stem}.md"
    out.write_text("\n".join(head))
    print("\n".join(head))
    print(f"wrote {out} and {raw_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
