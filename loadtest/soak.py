"""Soak: good load plus every attack for a long time; memory and descriptors must level off.

    python loadtest/soak.py                      # 10 minutes
    python loadtest/soak.py --seconds 60 --out /tmp/soak

Starts a muxsrv (``python -m muxsrv --port 0`` with limits that answer every
attack within seconds: see ``SERVER_ARGS``; add your own with ``--server-arg``),
and Locust (``loadtest/locustfile.py``, headless) with good echo users and
``--mux-attack all``.  Every second it samples the server's resident memory
(VmRSS) and its open descriptors.  After the warm-up (a fifth of the run, at
most 2 minutes) neither may still trend upward: the median of the last third
of the samples may exceed the median of the first third by at most
``RSS_SLACK`` (or 10 %) and ``FD_SLACK`` (or 20 %).  Nor may a good user's
request fail.  Writes ``soak.csv`` (the samples), ``soak.png`` (both over
time, with matplotlib from the bench extra; skipped with a note without it),
Locust's ``locust_stats.csv`` and the server's log into ``--out``; prints one
line per verdict; exit status 0 if it held, 1 if not, 2 if it could not run.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
#: Limits tight enough that every attacker is answered many times in a minute.
SERVER_ARGS = ["--handler", "echo", "--log-level", "warning", "--frame-timeout", "5",
               "--max-buffered", "64M", "--output-soft-limit", "4M", "--output-soft-seconds", "5"]
#: Growth of the median RSS from the first to the last third after warm-up that is
#: still level (allocator noise), or 10 % of it if more.
RSS_SLACK = 16 * 1024 * 1024
#: The same for descriptors (a churn's connections come and go), or 20 %.
FD_SLACK = 20
LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


def sample(pid: int) -> tuple[int, int] | None:
    """(VmRSS bytes, open descriptors) of ``pid``; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def trend(values: list[int], slack: int, share: float) -> tuple[bool, float, float]:
    """(level, median of the first third, of the last third) of the samples after warm-up."""
    third = max(1, len(values) // 3)
    first, last = statistics.median(values[:third]), statistics.median(values[-third:])
    return last - first <= max(slack, share * first), first, last


def good_failures(stats: Path) -> tuple[int, int]:
    """(requests, failures) of the good users (every type but 'attack') in Locust's CSV."""
    requests = failures = 0
    with stats.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Type"] not in ("", "attack"):
                requests += int(row["Request Count"])
                failures += int(row["Failure Count"])
    return requests, failures


def plot(samples: Samples, warmup: float, path: Path) -> bool:
    """Both series over time, the warm-up shaded; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(samples.t, [r / 2**20 for r in samples.rss])
    top.set_ylabel("server RSS (MiB)")
    bottom.plot(samples.t, samples.fds, color="tab:orange")
    bottom.set_ylabel("open descriptors")
    bottom.set_xlabel("seconds")
    for ax in (top, bottom):
        ax.axvspan(0, warmup, color="0.9", label="warm-up")
        ax.grid(alpha=0.3)
    top.legend(loc="upper left")
    top.set_title("muxsrv soak: good load and every attack")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="how long (default 600)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds not judged (default: a fifth of the run, at most 120)")
    p.add_argument("--good-users", type=int, default=10, help="good echo users (10)")
    p.add_argument("--attack-users", type=int, default=2, help="users of each attack (2)")
    p.add_argument("--out", type=Path, default=None, help="where the files go (a new temp dir)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more muxsrv argument (repeat it)")
    args = p.parse_args(argv)
    if args.seconds < 10:
        p.error("--seconds must be at least 10")
    if args.warmup is None:
        args.warmup = min(120.0, args.seconds / 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="muxsrv-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    log_path = out / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "muxsrv", "--port", "0", *SERVER_ARGS, *args.server_arg],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT,
        )
    locust: subprocess.Popen[bytes] | None = None
    try:
        address = wait_listening(server, log_path)
        if address is None:
            print(f"soak: the server did not start; see {log_path}", file=sys.stderr)
            return 2
        users = args.good_users + 7 * args.attack_users
        with (out / "locust.log").open("wb") as llog:
            locust = subprocess.Popen(
                [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                 "-u", str(users), "-r", str(users), "-t", f"{int(args.seconds)}s",
                 "--host", f"tcp://{address}", "--mux-attack", "all",
                 "--mux-attack-users", str(args.attack_users), "--csv", str(out / "locust"),
                 "--only-summary"],
                stdin=subprocess.DEVNULL, stdout=llog, stderr=subprocess.STDOUT, env=env,
                cwd=ROOT, start_new_session=True,
            )
        samples = watch(server.pid, args.seconds)
        locust.wait(timeout=60)
    finally:
        for proc in (locust, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM if proc is server else signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return judge(args, out, samples)


def wait_listening(server: subprocess.Popen[bytes], log_path: Path) -> str | None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        m = LISTENING.search(log_path.read_text(errors="replace"))
        if m:
            return f"{m.group(1)}:{m.group(2)}"
        time.sleep(0.1)
    return None


def watch(pid: int, seconds: float) -> Samples:
    """One sample a second for ``seconds`` (on the second: a slow sample does not drift)."""
    samples = Samples()
    start = time.monotonic()
    stop = threading.Event()
    tick = 0
    while (elapsed := time.monotonic() - start) < seconds:
        got = sample(pid)
        if got is None:
            break
        samples.t.append(round(elapsed, 2))
        samples.rss.append(got[0])
        samples.fds.append(got[1])
        tick += 1
        stop.wait(max(0.0, start + tick - time.monotonic()))
    return samples


def judge(args: argparse.Namespace, out: Path, samples: Samples) -> int:
    with (out / "soak.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seconds", "rss_bytes", "fds"])
        writer.writerows(zip(samples.t, samples.rss, samples.fds, strict=True))
    drawn = plot(samples, args.warmup, out / "soak.png")
    after = [i for i, t in enumerate(samples.t) if t >= args.warmup]
    if len(after) < 6:
        print(f"soak: too few samples after the warm-up ({len(after)}); the server died?")
        return 1
    ok = True
    level, first, last = trend([samples.rss[i] for i in after], RSS_SLACK, 0.10)
    ok &= level
    print(f"soak: RSS {first / 2**20:.1f} -> {last / 2**20:.1f} MiB after the warm-up: "
          f"{'level' if level else 'STILL GROWING'}")
    level, first, last = trend([samples.fds[i] for i in after], FD_SLACK, 0.20)
    ok &= level
    print(f"soak: descriptors {first:g} -> {last:g} after the warm-up: "
          f"{'level' if level else 'STILL GROWING'}")
    stats = out / "locust_stats.csv"
    if stats.exists():
        requests, failures = good_failures(stats)
        ok &= requests > 0 and failures == 0
        print(f"soak: good users {requests} requests, {failures} failures")
    else:
        ok = False
        print("soak: Locust wrote no report; see locust.log")
    print(f"soak: {'held' if ok else 'FAILED'}; files in {out}"
          + ("" if drawn else " (no soak.png: pip install matplotlib)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
