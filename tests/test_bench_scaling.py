"""loadtest/bench/scaling.py: the table it prints, from made-up figures and from a short real run.

Catches: a setup missing from the table (HAProxy rows dropped, a worker count
ignored), ratios computed the wrong way round, a run that fails quietly
(exit 0 with a failed cell), and a script that no longer runs at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from support import ROOT

BENCH = ROOT / "loadtest" / "bench"
sys.path.insert(0, str(BENCH))

import scaling  # noqa: E402  (after the path: the bench modules are not a package)

pytestmark = pytest.mark.timeout(60)


def test_the_table_has_a_row_per_setup_and_the_ratios_right_way_round() -> None:
    args = scaling.parse_args(["--scenarios", "rr100"])
    cells = {}
    for workers, haproxy, rps in ((1, False, 100.0), (2, False, 180.0),
                                  (1, True, 50.0), (2, True, 60.0)):
        cell = scaling.Cell(rps=[rps, rps * 2, rps / 2], p99_us=[1500.0], cpu=[0.9])
        cells[(scaling.Setup(workers, haproxy), "rr100")] = cell
    cells[(scaling.Setup(2, True), "rr100")].failures.append("one run failed")
    lines = scaling.table(args, cells)
    assert lines[0] == "| setup | rr100 req/s | rr100 p99 ms | rr100 CPU |"
    assert lines[2:6] == [
        "| muxsrv direct --workers 1 | 100 | 1.50 | 0.90 |",
        "| muxsrv direct --workers 2 | 180 | 1.50 | 0.90 |",
        "| haproxy -> muxsrv --workers 1 | 50 | 1.50 | 0.90 |",
        "| haproxy -> muxsrv --workers 2 | 60! | 1.50 | 0.90 |",
    ]
    assert lines[-1] == (
        "rr100 (100 conns): --workers 2 / --workers 1 direct: 1.80x; --workers 2 / --workers 1 "
        "behind haproxy: 1.20x; haproxy / direct, --workers 1: 0.50x; haproxy / direct, "
        "--workers 2: 0.33x")


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")),
                    reason="the load generator needs a C compiler")
def test_a_short_run_prints_the_table() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH / "scaling.py"), "--scenarios", "rr100", "--repeats", "1",
         "--warmup", "0.1", "--duration", "0.3"],
        cwd=ROOT, capture_output=True, text=True, timeout=45,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")][1:]
    names = [row.split(" | ")[0][2:] for row in rows]
    expected = ["muxsrv direct --workers 1", "muxsrv direct --workers 2"]
    if shutil.which("haproxy"):
        expected += ["haproxy -> muxsrv --workers 1", "haproxy -> muxsrv --workers 2"]
    assert names == expected, run.stdout
    for row in rows:
        assert re.fullmatch(r"\| [^|]+ \| [\d,]+ \| [\d.]+ \| [\d.]+ \|", row), row
    assert re.search(r"^rr100 \(100 conns\): --workers 2 / --workers 1 direct: [\d.]+x",
                     run.stdout, re.M), run.stdout
