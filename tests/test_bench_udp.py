"""The UDP bench (loadtest/bench/udp.py) runs end to end, briefly, and its generator checks."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, running_server

BENCH = ROOT / "loadtest" / "bench"
needs_cc = pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")), reason="no C compiler")


def build() -> None:
    subprocess.run([sys.executable, "-c", "import cbuild; cbuild.build_all()"], cwd=BENCH,
                   check=True, timeout=120)


@needs_cc
def test_a_short_run_of_every_server_writes_the_table(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "udp.py", "--repeats", "1", "--duration", "0.3", "--warmup", "0.1",
         "--quiet-wait", "0", "--servers", "muxsrv,asyncio-datagram,c-recvmmsg",
         "--json", str(tmp_path / "udp.json")],
        cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("muxsrv", "asyncio-datagram", "c-recvmmsg"):
        assert f"| {name} |" in out.stdout
    assert "muxsrv / asyncio-datagram:" in out.stdout
    runs = json.loads((tmp_path / "udp.json").read_text())
    assert {r["server"] for r in runs} == {"muxsrv", "asyncio-datagram", "c-recvmmsg"}
    assert all(r["requests"] > 0 and r["corrupt"] == 0 for r in runs)


@needs_cc
def test_the_generator_catches_a_server_that_changes_replies() -> None:
    build()
    with running_server("--udp-only", "--handler", "upper") as srv:
        out = subprocess.run(
            [str(BENCH / "build" / "udpgen"), "--port", str(srv.port), "--socks", "4",
             "--warmup", "0", "--duration", "0.3", "--lost-ms", "50"],
            capture_output=True, text=True, timeout=30)
    result = json.loads(out.stdout)
    assert out.returncode == 1
    assert result["corrupt"] > 0 and result["requests"] == 0


@needs_cc
def test_the_generator_counts_lost_datagrams() -> None:
    build()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        out = subprocess.run(
            [str(BENCH / "build" / "udpgen"), "--port", str(silent.getsockname()[1]),
             "--socks", "3", "--warmup", "0", "--duration", "0.5", "--lost-ms", "50"],
            capture_output=True, text=True, timeout=30)
    result = json.loads(out.stdout)
    assert out.returncode == 1  # nothing came back
    assert result["lost"] >= 3 and result["requests"] == 0
