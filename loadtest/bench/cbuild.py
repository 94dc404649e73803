"""Build the C pieces (the load generator and the C echo server) with the system compiler.

The idea: nothing is checked in but the sources; ``build/`` (git-ignored) is
rebuilt whenever a source is newer than its binary, with ``$CC`` or cc/gcc.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from servers import BUILD, HERE

SOURCES = {
    "loadgen": HERE / "csrc" / "loadgen.c",
    "cecho": HERE / "csrc" / "cecho.c",
    "udpgen": HERE / "csrc" / "udpgen.c",  # udp.py's generator and C peer
    "cudpecho": HERE / "csrc" / "cudpecho.c",
}
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")


def compiler() -> str:
    for cc in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def build_all(force: bool = False) -> None:
    BUILD.mkdir(exist_ok=True)
    cc = None
    for name, src in SOURCES.items():
        out = BUILD / name
        if not force and out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
            continue
        cc = cc or compiler()
        subprocess.run([cc, *CFLAGS, "-o", str(out), str(src)], check=True)


def compiler_version() -> str:
    try:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True)
    except (RuntimeError, OSError):
        return "unknown"
    return out.stdout.splitlines()[0] if out.stdout else "unknown"
