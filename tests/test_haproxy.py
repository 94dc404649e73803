"""A real HAProxy in front of three muxsrv servers, with the README's haproxy.cfg.

HAProxy listens on 127.0.0.1; the servers on 127.0.0.2, .3 and .4 (all
loopback) run ``--proxy-protocol``.  The configuration is the README's block,
with only its addresses, ports and check interval changed (``config``), so a
README that drifts from what works fails here.  HAProxy runs in the
foreground and is killed by its PID whatever happens; its stats socket (in
the test's temporary directory) tells when it has marked a server up or down.
Skipped only where no ``haproxy`` is installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pytest

from tests.support import ROOT, ServerProcess, frame, plugin_env, recv_frame, wait_for

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="needs haproxy (.ci/run installs it)")

BACKENDS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
README_BLOCK = re.compile(r"```\n(# haproxy\.cfg\n.*?)```", re.S)


def readme_config() -> str:
    match = README_BLOCK.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert match, "the README's # haproxy.cfg block is gone"
    return match.group(1)


LINE_CHECK = {"0000000470696e67": "70696e670a"}  # the check's "ping" as a line: "ping\n"


def config(port: int, servers: list[tuple[str, int]], stats: Path, framing: str = "length") -> str:
    """The README's configuration with this test's addresses, and a stats socket."""
    text = readme_config()
    if framing == "line":
        for length, line in LINE_CHECK.items():
            assert text.count(length) == 2
            text = text.replace(length, line)
    assert text.count("bind :9999") == 1 and "inter 2s" in text
    lines = re.findall(r"^ +server app\d .*$", text, re.M)
    assert len(lines) == len(servers), "the README names three servers, as the test runs"
    for line, (host, sport) in zip(lines, servers, strict=True):
        text = text.replace(line, re.sub(r"app\d\.internal:9999", f"{host}:{sport}", line))
    text = text.replace("bind :9999", f"bind 127.0.0.1:{port}").replace("inter 2s", "inter 200ms")
    return f"global\n    stats socket {stats} level admin\n\n{text}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def backend(host: str, port: int = 0, framing: str = "length") -> ServerProcess:
    return ServerProcess(["--host", host, "--port", str(port), "--proxy-protocol",
                          "--framing", framing, "--handler", "muxsrv_testplugins.handlers:Peers"],
                         env=plugin_env()).wait_started()


def status(stats: Path) -> dict[str, str]:
    """Server name -> UP / DOWN ..., from HAProxy's ``show stat``."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "muxsrv_hosts"}


@contextmanager
def haproxy(cfg: Path) -> Iterator[subprocess.Popen[bytes]]:
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def ask_peers(port: int, count: int) -> list[str]:
    """``count`` connections open at once through HAProxy; each asks its peer."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    try:
        shown = []
        for sock in socks:
            sock.sendall(frame(b"peer?"))
        for sock in socks:
            assert recv_frame(sock) == (False, repr(sock.getsockname()).encode())
            shown.append(repr(sock.getsockname()))
        return shown
    finally:
        for sock in socks:
            sock.close()


def test_haproxy_in_front_of_three_servers(tmp_path: Path) -> None:
    with ExitStack() as stack:
        servers = [backend(host) for host in BACKENDS]
        for srv in servers:
            stack.callback(srv.kill)
        port = free_port()
        stats = tmp_path / "haproxy.sock"
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(config(port, [srv.address for srv in servers], stats))
        stack.enter_context(haproxy(cfg))
        wait_for(lambda: stats.exists() and status(stats) == {
            "app1": "UP", "app2": "UP", "app3": "UP", "BACKEND": "UP"}, 15, what="all UP")

        # The real client's address, in the reply and in the servers' logs.
        shown = ask_peers(port, 6)
        for peer in shown:
            pattern = re.escape(f"peer: {peer}")
            wait_for(lambda p=pattern: sum(s.log_count(p) for s in servers) == 1,  # type: ignore[misc]
                     what=f"a server logging {peer}")
        assert [srv.log_count("peer:") for srv in servers] == [2, 2, 2]  # leastconn
        assert all("127.0.0.1" in peer for peer in shown)

        # Pipelined, byte-exact, every size up to 1 MiB.
        payloads = [bytes(range(256)) * n for n in (0, 1, 7, 64, 4096)] + [b"x" * (1 << 20)]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"".join(frame(p) for p in payloads * 3))
            assert [recv_frame(sock) for _ in payloads * 3] == [(False, p) for p in payloads * 3]

        # A backend killed: marked down within the checks' interval, the others used.
        victim = servers[1]
        victim.kill()
        wait_for(lambda: status(stats)["app2"].startswith("DOWN"), 5, what="app2 DOWN")
        before = [srv.log_count("peer:") for srv in servers]
        ask_peers(port, 6)
        wait_for(lambda: sum(srv.log_count("peer:") for srv in servers) == sum(before) + 6,
                 what="six peer lines")
        after = [srv.log_count("peer:") for srv in servers]
        assert [a - b for a, b in zip(after, before, strict=True)] == [3, 0, 3]

        # Back on the same address: up again, and used again.
        revived = backend(*victim.address[:1], victim.port)
        stack.callback(revived.kill)
        wait_for(lambda: status(stats)["app2"] == "UP", 5, what="app2 UP again")
        ask_peers(port, 6)
        wait_for(lambda: sum(srv.log_count("peer:") for srv in (servers[0], servers[2], revived))
                 == after[0] + after[2] + 6, what="six more peer lines")
        assert revived.log_count("peer:") == 2
        # Five health checks a second each: not one line in the servers' logs.
        for srv in (servers[0], servers[2], revived):
            assert [line for line in srv.lines if not re.search("listening on|peer: ", line)
                    ] == [], srv.address


def test_line_framing_through_haproxy(tmp_path: Path) -> None:
    with ExitStack() as stack:
        servers = [backend(host, framing="line") for host in BACKENDS]
        for srv in servers:
            stack.callback(srv.kill)
        port = free_port()
        stats = tmp_path / "haproxy.sock"
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(config(port, [srv.address for srv in servers], stats, "line"))
        stack.enter_context(haproxy(cfg))
        wait_for(lambda: stats.exists() and set(status(stats).values()) == {"UP"}, 15,
                 what="all UP")
        lines = [b"peer?"] + [bytes(range(32, 127)) * n for n in (0, 1, 50, 2000)] + [b"end"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"".join(line + b"\n" for line in lines))
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := sock.recv(1 << 16):
                got += chunk
            shown = repr(sock.getsockname()).encode()
        assert got == b"".join(line + b"\n" for line in [shown, *lines[1:]])


LOCUSTFILE = """\
from locust import task

from muxsrv.locust import MuxUser


def echoed(sent: bytes, got: bytes) -> bool:  # each reply alone
    return got.startswith(b"('127.0.0.1', ") if sent == b"peer?" else got == sent


class ThroughHAProxy(MuxUser):
    handler = "echo"

    @task
    def pipelined(self) -> None:
        self.client.pipeline([b"a" * 100, b"peer?", b"b" * 5000], name="pipelined",
                             check=echoed)
"""


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="Locust is not installed")
def test_a_locust_run_through_haproxy_has_no_failures(tmp_path: Path) -> None:
    with ExitStack() as stack:
        servers = [backend(host) for host in BACKENDS]
        for srv in servers:
            stack.callback(srv.kill)
        port = free_port()
        stats = tmp_path / "haproxy.sock"
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(config(port, [srv.address for srv in servers], stats))
        stack.enter_context(haproxy(cfg))
        wait_for(lambda: stats.exists() and set(status(stats).values()) == {"UP"}, 15,
                 what="all UP")
        (tmp_path / "locustfile.py").write_text(LOCUSTFILE)
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "3",
             "-r", "3", "-t", "3s", "--csv", "run", "--only-summary",
             "--host", f"tcp://127.0.0.1:{port}"],
            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=60,
        )
        with (tmp_path / "run_stats.csv").open(newline="") as f:
            rows = {row["Name"]: row for row in csv.DictReader(f)}
        said = run.stdout[-2000:] + run.stderr[-2000:]
        assert run.returncode == 0, said
        assert int(rows["pipelined"]["Request Count"]) > 10, said
        assert rows["pipelined"]["Failure Count"] == "0", said
        assert sum(srv.log_count("peer:") for srv in servers) > 10
        assert all(srv.log_count("peer:") for srv in servers)  # every backend served some


NGINX_BLOCK = re.compile(r"```\n(stream \{\n.*?)```", re.S)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_the_readme_nginx_stream_config_is_accepted_by_nginx(tmp_path: Path) -> None:
    match = NGINX_BLOCK.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert match, "the README's nginx stream block is gone"
    block = match.group(1).replace("app1.internal", "127.0.0.2").replace(
        "app2.internal", "127.0.0.3").replace("listen 9999", f"listen 127.0.0.1:{free_port()}")
    modules = Path("/etc/nginx/modules-enabled")  # Debian's: where the stream module loads
    (tmp_path / "nginx.conf").write_text(
        (f"include {modules}/*.conf;\n" if modules.is_dir() else "")
        + f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n" + block)
    done = subprocess.run(["nginx", "-t", "-c", str(tmp_path / "nginx.conf")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
