"""What the numbers were measured on: CPU, cores, memory, kernel, Python, versions.

The idea: a benchmark result without its machine is a rumour.  Everything
here is read from /proc, the standard library, package metadata and
read-only git commands; nothing is changed.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import subprocess
import sys

from cbuild import compiler_version
from servers import ROOT

PEER_PACKAGES = ("uvloop", "gevent", "twisted", "tornado", "matplotlib")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / (1 << 20):.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def muxsrv_revision() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD") or "no commit"
    dirty = git("status", "--porcelain", "--", "muxsrv")
    return rev + (" + uncommitted changes in muxsrv/" if dirty else "")


def versions() -> str:
    found = []
    for name in PEER_PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def describe(server_cpu: int | None, gen_cpu: int | None) -> list[str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    pinning = (
        f"server on CPU {server_cpu}, load generator on CPU {gen_cpu} (taskset)"
        if server_cpu is not None
        else "not pinned (fewer than 2 CPUs available)"
    )
    return [
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_model()}; {os.cpu_count()} logical CPUs, "
        f"{len(os.sched_getaffinity(0))} usable; {pinning}",
        f"- Memory: {mem_total()}; kernel: {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()} ({sys.implementation.name}); "
        f"C compiler: {compiler_version()}",
        f"- Peers: {versions()}",
        f"- muxsrv: {muxsrv_revision()}",
        f"- Open files (RLIMIT_NOFILE): soft raised to hard = {soft} in server and generator "
        f"(hard limit {hard}; this sandbox does not allow raising it)",
    ]
