"""Build the C pieces (the load generator and the C echo server) with the system compiler.

The idea: nothing is checked in but the sources; ``build/`` (git-ignored) is
rebuilt whenever a source is newer than its binary, with ``$CC`` or cc/gcc.
``loadgen-tls`` is the same generator built with OpenSSL (``-DLOADGEN_TLS``);
where the OpenSSL headers or libraries are missing it is simply not built
(``tls_missing`` says why) and the TLS servers are skipped with that note,
while the plain ``loadgen``, which has none of the TLS code, is built as ever.
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
TLS_NAME = "loadgen-tls"
TLS_FLAGS = ("-DLOADGEN_TLS",)
TLS_LIBS = ("-lssl", "-lcrypto")
TLS_HINT = "install OpenSSL's headers (apt-get install libssl-dev) and run again"
#: Why loadgen-tls could not be built in this process, or None.
tls_missing: str | None = None


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
    build_tls(force)


def build_tls(force: bool = False) -> bool:
    """Build loadgen-tls if OpenSSL is there; False (and `tls_missing` set) if not."""
    global tls_missing
    out, src = BUILD / TLS_NAME, SOURCES["loadgen"]
    if not force and out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        tls_missing = None
        return True
    out.unlink(missing_ok=True)  # never a stale one beside a failed build
    argv = [compiler(), *CFLAGS, *TLS_FLAGS, "-o", str(out), str(src), *TLS_LIBS]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip())
        tls_missing = f"{TLS_NAME} could not be built ({first.strip()[:160]}): {TLS_HINT}"
        return False
    tls_missing = None
    return True


def compiler_version() -> str:
    try:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True)
    except (RuntimeError, OSError):
        return "unknown"
    return out.stdout.splitlines()[0] if out.stdout else "unknown"
