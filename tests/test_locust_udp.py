"""Locust over UDP: ``--host udp://HOST:PORT``; a lost datagram fails its request after
``--mux-timeout``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, running_server
from test_locust import needs_locust, run_locust


@needs_locust
@pytest.mark.parametrize("handler", ["echo", "upper"])
def test_udp_run_has_no_failures(tmp_path: Path, handler: str) -> None:
    with running_server("--udp-only", "--handler", handler) as srv:
        run = run_locust(tmp_path, f"udp://{srv.host}:{srv.port}", "--mux-handler", handler,
                         "--mux-size", "64", "--mux-pipeline", "2", users=5, seconds=2)
    assert run.returncode == 0, run.describe()
    assert run.requests > 100, run.describe()
    assert run.failures == 0, run.describe()
    assert any(kind == handler for kind, _name in run.rows), run.rows.keys()


@needs_locust
def test_lost_datagrams_are_failures_after_the_timeout(tmp_path: Path) -> None:
    # A bound socket that never reads: every datagram is taken, none answered.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        run = run_locust(tmp_path, f"udp://127.0.0.1:{port}", "--mux-timeout", "0.2",
                         users=3, seconds=2)
    assert run.returncode == 1, run.describe()
    assert run.requests == run.failures > 0, run.describe()
    assert any("LostDatagram" in e and "no reply within 0.2 s" in e for e in run.errors), \
        run.errors
    # One in flight per user, each waiting 0.2 s: about 3 users x 2 s / 0.2 s.
    assert run.requests < 100, run.describe()


@needs_locust
def test_udp_target_refuses_a_token() -> None:
    # In a process of its own: importing Locust monkey-patches the one it is in.
    code = (
        "from muxsrv.locust import OptionError, target\n"
        "assert target('udp://127.0.0.1:9').udp\n"
        "assert not target('tcp://127.0.0.1:9').udp\n"
        "try:\n"
        "    target('udp://127.0.0.1:9', token_file='/nonexistent')\n"
        "except OptionError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "--mux-token-file needs TCP" in out.stdout
