"""``muxsrv-client --stat``: the lines from /stats, exactly; the loop against a fake admin port."""

from __future__ import annotations

import copy
import io
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest
from fake_admin import STATS, fake_admin
from support import ROOT, wait_for

from muxsrv import client_stat
from muxsrv.client_stat import HEADER_EVERY, AdminError, Display, Sample


def sample(at: float, *, current: int = 3, m_in: int = 0, m_out: int = 0, b_in: int = 0,
           b_out: int = 0, errors: int = 0, p99: float | None = 45.0) -> Sample:
    return Sample(at, current, m_in, m_out, b_in, b_out, errors, p99)


def cells(line: str) -> list[str]:
    return line.split()


def test_from_stats_takes_the_largest_p99_and_the_workers() -> None:
    """Bug caught: the p99 of the first handler shown, not the worst one."""
    stats = {**copy.deepcopy(STATS), "workers": [{"worker": 0}, {"worker": 1}]}
    got = Sample.from_stats(stats, 7.0)
    assert got == Sample(7.0, 3, 1000, 998, 40000, 39920, 0, 2500.0, workers=2)
    stats["latency"] = {}
    assert Sample.from_stats(stats, 7.0).p99_us is None


@pytest.mark.parametrize("broken", [{}, {"connections": {}}, {**STATS, "messages": None},
                                    {**STATS, "bytes": {"in": "x", "out": 1}}])
def test_from_stats_refuses_what_is_not_stats(broken: dict[str, Any]) -> None:
    with pytest.raises(AdminError, match="not muxsrv's /stats"):
        Sample.from_stats(broken, 0.0)


def test_lines_are_rates_over_the_time_that_passed() -> None:
    """Bug caught: rates per fetch instead of per second, bytes not in MB, the first
    sample printed with made-up rates."""
    display = Display()
    assert display.add(sample(10.0, m_in=1000, m_out=1000, b_in=0, b_out=0)) == []
    header, line = display.add(sample(12.0, current=7, m_in=21000, m_out=3000, b_in=5_000_000,
                                      b_out=1_000_000, errors=4, p99=1250.0))
    assert cells(header) == ["conns", "in/s", "out/s", "MB/s", "in", "MB/s", "out", "p99",
                             "err/s"]
    assert cells(line) == ["7", "10.0k", "1000", "2.50", "0.50", "1.25ms", "2"]
    assert len(line) == len(header)  # the columns line up
    (line,) = display.add(sample(13.0, m_in=21000, m_out=3000, b_in=5_000_000, b_out=1_000_000,
                                 errors=4, p99=None))
    assert cells(line) == ["3", "0", "0", "0.00", "0.00", "-", "0"]


def test_a_header_every_twenty_lines() -> None:
    display = Display()
    printed = [line for at in range(2 * HEADER_EVERY + 2)
               for line in display.add(sample(float(at)))]
    headers = [i for i, line in enumerate(printed) if line == Display.header()]
    assert headers == [0, HEADER_EVERY + 1, 2 * HEADER_EVERY + 2]


def test_a_restarted_server_gives_no_negative_rate() -> None:
    display = Display()
    display.add(sample(0.0, m_in=5000))
    (_, line) = display.add(sample(1.0, m_in=300))
    assert cells(line)[1] == "300"


@pytest.mark.parametrize(("us", "shown"), [(45.0, "45µs"), (999.4, "999µs"), (1000.0, "1ms"),
                                           (12_345.0, "12.3ms"), (3_200_000.0, "3.2s")])
def test_durations(us: float, shown: str) -> None:
    assert client_stat.duration(us) == shown


@pytest.mark.parametrize(("rate", "shown"), [(0, "0"), (2.5, "2.5"), (950, "950"),
                                             (9999, "9999"), (12_345, "12.3k"),
                                             (4_560_000, "4.56M")])
def test_counts(rate: float, shown: str) -> None:
    assert client_stat.count(rate) == shown


def test_run_with_a_fake_clock_against_the_fake_admin() -> None:
    """Bug caught: the loop's timing or its gap handling: a failed fetch mid-run ending the
    run, or a rate computed across the gap."""
    with fake_admin(step={"messages.in": 100, "messages.out": 100}) as fake:
        now = [0.0]
        out, err = io.StringIO(), io.StringIO()
        rounds = [0]

        def sleep(seconds: float) -> None:
            now[0] += max(seconds, 0.5)
            rounds[0] += 1
            if rounds[0] == 2:
                fake.status = 500
            elif rounds[0] == 3:
                fake.status = 200
            elif rounds[0] == 6:
                raise KeyboardInterrupt

        status = client_stat.run("127.0.0.1", fake.port, interval=0.5, out=out, err=err,
                                 clock=lambda: now[0], sleep=sleep)
    assert status == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"muxsrv at 127.0.0.1:{fake.port}: a line every 0.5 s")
    data = [cells(line) for line in lines[1:] if line != Display.header()]
    # fetch 1 primes, 2 prints, 3 fails, 4 primes again, 5 and 6 print; each adds 100
    # in 0.5 s: 200/s, and no line across the gap (that would say 400).
    assert [row[1] for row in data] == ["200", "200", "200"]
    assert err.getvalue().splitlines() == [
        f"muxsrv-client: admin port 127.0.0.1:{fake.port}: HTTP 500 Internal Server Error "
        "for /stats; trying again every 0.5 s",
        "muxsrv-client: the admin port answers again"]


def stat_command(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "muxsrv.client", "--stat", *args]


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(stat_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                      "PYTHONIOENCODING": "utf-8", **(env or {})})


def test_stat_process_until_ctrl_c() -> None:
    """Bug caught: Ctrl-C ending in a traceback or a non-zero status, no line a second,
    the token not sent as a Bearer, a --workers server's count not said."""
    stats = {**copy.deepcopy(STATS), "workers": [{"worker": 0}, {"worker": 1}]}
    with fake_admin(stats, step={"messages.in": 50, "handler_errors": 1}) as fake:
        proc = spawn("--admin", fake.address, "--interval", "0.1",
                     env={"MUXSRV_TOKEN": "s3cret-token-0123456789"})
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            lines.extend(line.rstrip("\n") for line in proc.stdout)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_for(lambda: len(lines) >= 5, timeout=15, what="four lines")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(5)
        assert proc.stderr is not None
        assert proc.stderr.read() == ""
    assert lines[0].startswith(f"muxsrv at 127.0.0.1:{fake.port}, 2 workers: a line every")
    assert lines[1] == Display.header()
    for line in lines[2:5]:
        row = cells(line)
        assert row[0] == "3" and row[5] == "2.5ms"
        assert float(row[1]) > 0 and float(row[6]) > 0
    assert {auth for _, auth in fake.requests} == {"Bearer s3cret-token-0123456789"}
    assert {path for path, _ in fake.requests} == {"/stats"}


def test_no_admin_port_is_one_line_and_status_1() -> None:
    """Bug caught: a traceback, or a wait forever, when nothing listens on the admin port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    done = subprocess.run(stat_command("--admin", f"127.0.0.1:{port}"), capture_output=True,
                          text=True, cwd=ROOT, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (f"muxsrv-client: error: cannot reach the admin port 127.0.0.1:{port}: "
                           "Connection refused\n")


def test_a_refusing_admin_port_says_so() -> None:
    with fake_admin() as fake:
        fake.status = 401
        done = subprocess.run(stat_command("--admin", fake.address), capture_output=True,
                              text=True, cwd=ROOT, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert done.stderr.strip().endswith("HTTP 401 Unauthorized for /stats (give the token: "
                                        "--token-file)")


@pytest.mark.parametrize(("args", "said"), [
    (["--admin", "9998"], "give HOST:PORT"),
    (["--admin", "localhost:99999"], "the port must be from 1 to 65535"),
    (["hello"], "--stat sends nothing"),
])
def test_stat_option_mistakes(args: list[str], said: str) -> None:
    done = subprocess.run(stat_command(*args), capture_output=True, text=True, cwd=ROOT,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr
