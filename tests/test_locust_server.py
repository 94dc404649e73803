"""The Locust kit's end of run: --mux-admin's server figures beside Locust's, and a final --csv.

Runs are Locust headless against a real muxsrv, with the admin listener a
stand-in (tests/fake_admin.py) whose /stats has known figures, and once the
server's own admin port.
This process never imports Locust.
"""

from __future__ import annotations

import csv
import re
import socket
import subprocess
from pathlib import Path

from fake_admin import STATS, fake_admin
from support import ROOT, running_server
from test_admin import admin_address
from test_locust import LOCUST_GRACE, LOCUSTFILE, locust_command, needs_locust, run_locust, tcp


def printed_total(output: str) -> int:
    """The request count of the Aggregated line of Locust's first (totals) table."""
    m = re.search(r"^\s+Aggregated\s+(\d+)\s+\d+\(", output, re.M)
    assert m, output[-3000:]
    return int(m.group(1))


@needs_locust
def test_server_latency_beside_locusts_and_a_final_csv(tmp_path: Path) -> None:
    """Bugs caught: the server's figures not fetched at the end, printed rounded to the
    millisecond like Locust's, not written next to --csv; the CSV's Aggregated row lagging
    the totals Locust printed (its last write is up to a second before the end); the
    --mux-token-file token not sent to the admin port."""
    token = tmp_path / "token"
    token.write_text("# the load test's\nadmin-token-0123456789abcdef\n")
    with fake_admin() as admin, running_server("--handler", "echo",
                                               "--auth-token-file", str(token)) as srv:
        run = run_locust(tmp_path, tcp(srv.host, srv.port), "--mux-admin", admin.address,
                         "--mux-token-file", str(token), users=4, seconds=2)
    assert run.returncode == 0, run.describe()
    assert run.failures == 0, run.describe()
    assert run.requests == printed_total(run.output) > 100, run.describe()
    assert admin.requests == [("/stats", "Bearer admin-token-0123456789abcdef")]
    lines = run.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Latency in ms:"))
    assert f"from {admin.address}" in lines[start]
    table = {tuple(line.split()[:2]): line.split()[2:] for line in lines[start + 3:start + 7]}
    assert table[("muxsrv", "echo")] == ["998", "0.012", "0.020", "0.045", "0.090", "0.120"]
    assert table[("muxsrv", "upper")] == ["10", "0.900", "1.500", "2.500", "2.600", "2.700"]
    assert table[("Locust", "Aggregated")][0] == str(run.requests)
    with (tmp_path / "locust_server.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    echo = STATS["latency"]["echo"]
    assert rows[0] == ["Handler", "Count", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"]
    assert rows[1] == ["echo", "998", *(str(echo[k]) for k in
                                         ("p50_us", "p90_us", "p99_us", "p999_us", "max_us"))]
    assert rows[2][0] == "upper" and len(rows) == 3


@needs_locust
def test_an_admin_port_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    """Bug caught: a traceback, or a failed run, because the admin port was not there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with running_server("--handler", "echo") as srv:
        run = run_locust(tmp_path, tcp(srv.host, srv.port), "--mux-admin", f"127.0.0.1:{port}",
                         users=2, seconds=1)
    assert run.returncode == 0, run.describe()
    assert run.requests == printed_total(run.output), run.describe()
    said = [line for line in run.output.splitlines() if "--mux-admin" in line]
    assert len(said) == 1 and said[0].endswith(
        f"--mux-admin: cannot reach the admin port 127.0.0.1:{port}: Connection refused; "
        "no server-side figures"), run.describe()
    assert "Traceback" not in run.output
    assert not (tmp_path / "locust_server.csv").exists()


@needs_locust
def test_a_bad_mux_admin_is_refused_at_start() -> None:
    """Bug caught: a run of minutes whose server figures are lost at the end to a typo."""
    command = locust_command(LOCUSTFILE, "--headless", "-u", "1", "-t", "5s", "--host",
                             "tcp://127.0.0.1:9", "--mux-admin", "9998")
    proc = subprocess.run(command, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=LOCUST_GRACE)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.rstrip().endswith(
        "error: argument --mux-admin: '9998': give HOST:PORT, such as 127.0.0.1:9998")


@needs_locust
def test_the_figures_of_a_real_admin_port(tmp_path: Path) -> None:
    """Bugs caught: the kit and the server's /stats disagreeing on its shape (the kit was
    written against a stand-in), the server's count not the messages Locust sent."""
    with running_server("--handler", "echo", "--admin-port", "0") as srv:
        host, port = admin_address(srv)
        run = run_locust(tmp_path, tcp(srv.host, srv.port), "--mux-admin", f"{host}:{port}",
                         users=2, seconds=1)
    assert run.returncode == 0 and run.failures == 0, run.describe()
    with (tmp_path / "locust_server.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Handler", "Count", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"]
    assert [row[0] for row in rows[1:]] == ["echo"], rows
    # Every request Locust counted was answered and timed by the server (the server may
    # have answered a few more that the run's end cut off before Locust counted them).
    assert run.requests <= int(rows[1][1]) <= run.requests + 10, (rows, run.describe())
    p50, p90, p99, p999, most = (float(v) for v in rows[1][2:])
    assert 0 < p50 <= p90 <= p99 <= p999 <= most, rows
