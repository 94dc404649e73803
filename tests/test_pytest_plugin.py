"""The pytest plugin and the threaded server under it: real servers, stopped when done.

Bugs caught: a server left running after the test that started it (its port
still accepts), options not parsed as the command line parses them, a handler
object refused, a mistake reported as SystemExit instead of an error naming
it, and a plugin module whose import drags the server (or pytest) into
every pytest run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import ROOT

from muxsrv import Conn, Handler
from muxsrv.threaded import ThreadedServer


def refuses_connections(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_named_handler_with_options_serves_and_stops() -> None:
    srv = ThreadedServer("upper", "--framing", "line").start()
    try:
        with srv.connect() as c:
            assert c.framing == "line"
            assert c.pipeline([b"a", b"b\r"]) == [b"A", b"B"]
    finally:
        srv.stop()
    assert refuses_connections(srv.address)


class Twice(Handler):
    """Two replies per message: the handler shape a Client pipeline cannot assume."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.send(payload)
        conn.send(payload[::-1])


def test_handler_objects_class_and_closure() -> None:
    seen: list[bytes] = []

    def record(payload: bytes) -> bytes:
        seen.append(payload)
        return b"ok"

    with ThreadedServer(Twice) as srv, srv.connect() as c:
        c.send(b"ab")
        assert [c.recv(), c.recv()] == [b"ab", b"ba"]
    with ThreadedServer(record) as srv, srv.connect() as c:
        assert c.request(b"x") == b"ok"
    assert seen == [b"x"]


class Clash(Handler):
    """Declares an option the core already has."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--port", type=int)


@pytest.mark.parametrize(
    ("handler", "options", "why"),
    [
        (Clash, (), "conflicting option string: --port"),
        ("upper", ("--auth-token-file", "tokens"), "--auth-token-file"),
        ("upper", ("--framing", "nope"), "invalid choice"),
        ("upper", ("--workers", "2"), "--workers"),
        ("upper", ("--handler", "echo"), "first argument"),
        ("nope", (), "unknown handler 'nope'"),
        (42, (), "expected a function"),
    ],
)
def test_mistakes_raise_naming_them(handler: object, options: tuple[str, ...], why: str) -> None:
    with pytest.raises(Exception, match=why) as info:
        ThreadedServer(handler, *options)
    assert not isinstance(info.value, SystemExit)


def test_stop_from_the_test_thread_interrupts_an_idle_loop() -> None:
    """With no idle timeout nothing wakes the loop but call_soon_threadsafe."""
    srv = ThreadedServer("echo", "--idle-timeout", "0").start()
    srv.stop()  # raises if the thread did not end
    assert refuses_connections(srv.address)


def run_pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest in `tmp_path`, muxsrv importable from the checkout, the plugin loaded
    by -p alone (autoload off: an installed muxsrv would register it a second time)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "muxsrv.pytest_plugin", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_fixture_stops_every_server_at_the_end_of_its_test(tmp_path: Path) -> None:
    ports = tmp_path / "ports"
    (tmp_path / "test_uses_fixture.py").write_text(textwrap.dedent(f"""
        def test_two_servers(muxsrv_server):
            a = muxsrv_server("upper")
            b = muxsrv_server("muxsrv.handlers.builtin:echo", "--framing", "line")
            assert a.client.request(b"hi") == b"HI"
            assert b.client.request(b"hi") == b"hi" and b.framing == "line"
            with open({str(ports)!r}, "a") as f:
                f.write(f"{{a.port}} {{b.port}}\\n")

        def test_a_wrong_reply_fails(muxsrv_server):
            assert muxsrv_server("upper").client.request(b"x") == b"x"
    """))
    done = run_pytest(tmp_path)
    assert "1 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    started = [int(p) for p in ports.read_text().split()]
    assert len(started) == 2
    for port in started:
        assert refuses_connections(("127.0.0.1", port)), port


def test_plugin_import_is_cheap_and_muxsrv_needs_no_pytest() -> None:
    code = textwrap.dedent("""
        import sys
        import muxsrv
        assert 'pytest' not in sys.modules, 'muxsrv imported pytest'
        import muxsrv.pytest_plugin
        heavy = {'muxsrv.server', 'muxsrv.client', 'muxsrv.threaded'} & set(sys.modules)
        assert not heavy, heavy
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
