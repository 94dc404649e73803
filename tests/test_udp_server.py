"""UDP over real sockets on 127.0.0.1: ``python -m muxsrv --udp`` as a user runs it."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    ROOT,
    ServerProcess,
    frame,
    plugin_env,
    recv_frame,
    running_server,
    wait_for,
)

from muxsrv.loop import EventLoop
from muxsrv.udp import DatagramEndpoint

UDP_PLUGINS = "muxsrv_testplugins.udp"


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    yield sock
    sock.close()


def ask(sock: socket.socket, address: tuple[str, int], payload: bytes) -> bytes:
    sock.sendto(payload, address)
    data, sender = sock.recvfrom(70_000)
    assert sender == address
    return data


def test_echo_over_udp_and_tcp_on_one_port(udp: socket.socket) -> None:
    with running_server("--udp") as srv:
        line = srv.stderr_text()
        assert "framing does not apply" in line and f"UDP on 127.0.0.1:{srv.port}" in line
        assert ask(udp, srv.address, b"hello") == b"hello"
        assert ask(udp, srv.address, b"") == b""
        big = bytes(range(256)) * 200  # 51,200 bytes: one datagram, one message
        assert ask(udp, srv.address, big) == big
        with srv.connect() as tcp:
            tcp.sendall(frame(b"tcp too"))
            assert recv_frame(tcp) == (False, b"tcp too")


def test_upper_udp_only(udp: socket.socket) -> None:
    with running_server("--udp-only", "--handler", "upper") as srv:
        assert "UDP only, framing does not apply" in srv.stderr_text()
        assert ask(udp, srv.address, b"hello\nworld") == b"HELLO\nWORLD"  # no lines, no frames
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(srv.address, timeout=5).close()


@pytest.mark.skipif(shutil.which("nc") is None, reason="nc is not installed")
@pytest.mark.parametrize(("handler", "reply"), [("echo", b"hello nc"), ("upper", b"HELLO NC")])
def test_echo_and_upper_with_nc(handler: str, reply: bytes) -> None:
    with running_server("--udp", "--handler", handler) as srv:
        # -w 1: nc waits that long for the reply after stdin ends, then exits.
        out = subprocess.run(["nc", "-u", "-w", "1", "127.0.0.1", str(srv.port)],
                             input=b"hello nc", capture_output=True, timeout=10)
        assert out.stdout == reply


def test_one_instance_per_peer() -> None:
    with running_server("--udp-only", "--handler", f"{UDP_PLUGINS}:Counter",
                        env=plugin_env()) as srv:
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with a, b:
            a.settimeout(5)
            b.settimeout(5)
            assert ask(a, srv.address, b"x") == b"1 x"
            assert ask(a, srv.address, b"y") == b"2 y"
            assert ask(b, srv.address, b"z") == b"1 z"
            assert ask(a, srv.address, b"w") == b"3 w"
        wait_for(lambda: srv.log_count("made") >= 2)  # (the stderr reader may lag)
        assert srv.log_count("made") == 2


def test_idle_instances_expire() -> None:
    with running_server("--udp-only", "--idle-timeout", "0.3", "--handler",
                        f"{UDP_PLUGINS}:Counter", env=plugin_env()) as srv, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
        a.settimeout(5)
        assert ask(a, srv.address, b"x") == b"1 x"
        assert ask(a, srv.address, b"x") == b"2 x"
        srv.wait_log(rf"lost \('127\.0\.0\.1', {a.getsockname()[1]}\)", timeout=10)
        assert ask(a, srv.address, b"x") == b"1 x"  # a fresh instance


def test_peer_bound_drops_the_least_recently_active() -> None:
    with running_server("--udp-only", "--udp-max-peers", "2", "--handler",
                        f"{UDP_PLUGINS}:Counter", env=plugin_env()) as srv:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for s in socks:
                s.settimeout(5)
            a, b, c = socks
            assert ask(a, srv.address, b"1") == b"1 1"
            assert ask(b, srv.address, b"1") == b"1 1"
            assert ask(a, srv.address, b"2") == b"2 2"  # a is the most recent now
            assert ask(c, srv.address, b"1") == b"1 1"  # full: b goes
            srv.wait_log(rf"lost \('127\.0\.0\.1', {b.getsockname()[1]}\)")
            assert "--udp-max-peers 2" in srv.wait_log("peer table full")
            assert ask(a, srv.address, b"3") == b"3 3"  # a kept its instance
            assert ask(b, srv.address, b"2") == b"1 2"  # b starts again (c goes)
        finally:
            for s in socks:
                s.close()


def test_amplification_cap_until_the_token_is_echoed(udp: socket.socket) -> None:
    with running_server("--udp-only", "--handler", f"{UDP_PLUGINS}:TokenEcho",
                        env=plugin_env()) as srv:
        udp.sendto(b"SIZE 1000", srv.address)  # 9 bytes: at most 27 back
        srv.wait_log("amplification")
        assert ask(udp, srv.address, b"SIZE 0027") == b"x" * 27
        token = ask(udp, srv.address, b"HELLO")
        assert len(token) == 12
        assert ask(udp, srv.address, b"TOKEN " + token) == b"OK"
        assert ask(udp, srv.address, b"SIZE 60000") == b"x" * 60000
        udp.sendto(b"SIZE 65508", srv.address)
        srv.wait_log("reply over 65,507 bytes")


def test_function_handler_amplification(udp: socket.socket) -> None:
    with running_server("--udp-only", "--handler", f"{UDP_PLUGINS}:quadruple",
                        env=plugin_env()) as srv:
        udp.sendto(b"abc", srv.address)
        assert "12 bytes dropped: amplification" in srv.wait_log("amplification")
    with running_server("--udp-only", "--handler", f"{UDP_PLUGINS}:triple",
                        env=plugin_env()) as srv:
        assert ask(udp, srv.address, b"abc") == b"abcabcabc"


@pytest.mark.parametrize(("args", "said"), [
    (["--handler", "exec", "--udp"], "handler exec refuses --udp: a forged source address "
                                     "would run commands for someone else"),
    (["--handler", "exec", "--udp-only"], "handler exec refuses --udp-only"),
    (["--udp", "--workers", "2"], "--udp needs --workers 1"),
    (["--udp", "--proxy-protocol"], "--udp cannot go with --proxy-protocol"),
    (["--udp", "--tls-cert", "server.pem"], "--udp cannot go with --tls-cert: datagrams would "
                                            "go in plaintext"),
    (["--udp-only", "--auth-token-file", "tokens"], "--udp-only cannot go with "
                                                    "--auth-token-file"),
    (["--udp", "--udp-only"], "not allowed with argument"),
])
def test_refused_at_start(args: list[str], said: str) -> None:
    out = subprocess.run([sys.executable, "-m", "muxsrv", "--port", "0", *args],
                         capture_output=True, text=True, timeout=30, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert said in out.stderr
    assert "listening" not in out.stderr


def test_a_function_handler_may_declare_itself_unsafe() -> None:
    out = subprocess.run([sys.executable, "-m", "muxsrv", "--port", "0", "--udp", "--handler",
                          f"{UDP_PLUGINS}:unsafe"], capture_output=True, text=True, timeout=30,
                         cwd=ROOT, env={**plugin_env(), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert f"handler {UDP_PLUGINS}:unsafe refuses --udp: it trusts the source address" \
        in out.stderr


def test_a_second_server_cannot_share_the_udp_port() -> None:
    """No SO_REUSEADDR on the UDP socket: with it, Linux lets a second socket bind the
    same port and take datagrams meant for the first."""
    with running_server("--udp-only") as srv:
        out = subprocess.run([sys.executable, "-m", "muxsrv", "--udp-only", "--port",
                              str(srv.port)], capture_output=True, text=True, timeout=30,
                             cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{srv.port}: Address already in use" in out.stderr


def test_a_udp_flood_does_not_starve_tcp() -> None:
    """One socket floods datagrams (bounded: 4 s or 300,000) while TCP echo round
    trips go on; then a TCP pipeline floods while UDP round trips go on."""
    with running_server("--udp") as srv:
        stop = threading.Event()
        sent = [0]

        def flood() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(srv.address)  # (never reads: its replies pile up and are lost)
                payload = b"f" * 64
                deadline = time.monotonic() + 4
                while not stop.is_set() and sent[0] < 300_000 and time.monotonic() < deadline:
                    with contextlib.suppress(OSError):
                        s.send(payload)
                    sent[0] += 1

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        times = []
        try:
            wait_for(lambda: sent[0] > 1000, timeout=10)
            with srv.connect() as tcp:
                for i in range(100):
                    t = time.monotonic()
                    tcp.sendall(frame(b"%d" % i))
                    assert recv_frame(tcp) == (False, b"%d" % i)
                    times.append(time.monotonic() - t)
        finally:
            stop.set()
            flooder.join(10)
        assert statistics.median(times) < 0.1, times
        assert max(times) < 2.0, times

        # TCP floods (a pipeline that never reads its replies), UDP round trips go on.
        with srv.connect() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            tcp.setblocking(False)
            chunk = frame(b"t" * 64) * 1000
            udp_times = []
            for i in range(100):
                with contextlib.suppress(BlockingIOError):
                    tcp.send(chunk)
                t = time.monotonic()
                assert ask(u, srv.address, b"%d" % i) == b"%d" % i
                udp_times.append(time.monotonic() - t)
        assert statistics.median(udp_times) < 0.1, udp_times
        assert max(udp_times) < 2.0, udp_times


def test_queue_bound_with_a_receiver_that_never_reads(tmp_path: Path) -> None:
    """Over AF_UNIX datagrams, where a full receiver makes ``sendto`` say EAGAIN (UDP on
    loopback drops at the receiver instead, and the sender never waits)."""
    server_path, client_path = str(tmp_path / "srv"), str(tmp_path / "cli")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(server_path)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    cli.bind(client_path)
    loop = EventLoop()
    ep = DatagramEndpoint(loop, function=lambda p: p * 3, max_queue=64 * 1024)
    try:
        ep.listen("", 0, [srv])
        payload = b"q" * 1000
        for _i in range(200):  # 200 replies of 3,000 bytes: the receiver's queue fills
            cli.sendto(payload, server_path)
            loop.run_once(max_wait=0)
        t = time.monotonic()
        loop.run_until(lambda: ep.counts.get("queue full (--udp-max-queue)", 0) > 0, 5)
        assert time.monotonic() - t < 5  # the loop never blocked
        assert 0 < ep.queued <= 64 * 1024
        dropped = ep.counts["queue full (--udp-max-queue)"]
        cli.setblocking(False)
        got = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (ep.queued or got == 0):
            loop.run_once(max_wait=0.01)
            try:
                while cli.recv(10_000):
                    got += 1
            except BlockingIOError:
                pass
        assert ep.queued == 0
        assert got + dropped == 200 and got > 0
    finally:
        ep.close()
        loop.close()
        cli.close()


def test_readme_token_echo_example(tmp_path: Path, udp: socket.socket) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(# token_echo\.py.*?)```", readme, re.S)
    assert code is not None
    (tmp_path / "token_echo.py").write_text(code.group(1))
    srv = ServerProcess(["--port", "0", "--udp", "--handler", "token_echo:TokenEcho"],
                        cwd=tmp_path)
    try:
        srv.wait_started()
        udp.sendto(b"SIZE 100", srv.address)
        srv.wait_log("amplification")
        token = ask(udp, srv.address, b"HELLO")
        assert ask(udp, srv.address, b"TOKEN " + token) == b"OK"
        assert ask(udp, srv.address, b"SIZE 100") == b"x" * 100
        with srv.connect() as tcp:  # the same handler over TCP: no cap to lift
            tcp.sendall(frame(b"SIZE 100"))
            assert recv_frame(tcp) == (False, b"x" * 100)
    finally:
        srv.stop()
