"""Protected mode, with a real non-loopback peer: a network namespace and a veth pair.

The server runs inside a namespace this test creates (so even ``--host 0.0.0.0``
reaches only that namespace's interfaces); the test, in the root namespace, is
the remote peer at the other end of the veth pair.  A loopback client runs
inside the namespace with ``ip netns exec``.  Needs root and ``ip``: CI has both.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from muxsrv.auth import PROTECTED_MODE, Gate, is_loopback_peer
from muxsrv.client import Client, ServerError
from muxsrv.codec import ErrorFrame
from muxsrv.stages.proxy import v1_header
from muxsrv.testing import Harness, frame
from tests.support import ROOT, ServerProcess, recv_frame

TOKEN = "protected-mode-token-0123"

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and the ip command (CI runs as root)",
)


@dataclass
class Netns:
    name: str
    inside: str  # the namespace's address on the veth pair
    outside: str  # ours, the remote peer's

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[Netns]:
    tag = os.getpid() % 100_000
    name, ours, theirs = f"muxsrv-t{tag}", f"mxo{tag}", f"mxi{tag}"
    subnet = f"10.213.{tag % 250}"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        _ip("link", "set", theirs, "netns", name)
        _ip("addr", "add", f"{subnet}.1/30", "dev", ours)
        _ip("link", "set", ours, "up")
        _ip("-n", name, "addr", "add", f"{subnet}.2/30", "dev", theirs)
        _ip("-n", name, "link", "set", theirs, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield Netns(name, f"{subnet}.2", f"{subnet}.1")
    finally:
        with suppress(subprocess.CalledProcessError):
            _ip("link", "del", ours)  # (gone with the namespace, unless it failed early)
        with suppress(subprocess.CalledProcessError):
            _ip("netns", "del", name)


@contextmanager
def server_in(ns: Netns, *args: str) -> Iterator[ServerProcess]:
    argv = ["ip", "netns", "exec", ns.name, sys.executable, "-m", "muxsrv", "--port", "0", *args]
    srv = ServerProcess(args, argv=argv)
    try:
        srv.wait_started()
        yield srv
    finally:
        if srv.proc.poll() is None:
            with suppress(subprocess.TimeoutExpired):
                srv.stop()


def request(host: str, port: int, token: str | None = None) -> str:
    """``reply: ...`` or ``error: ...``: what a client at ``host`` hears for ``ping``."""
    try:
        with Client(host, port, token=token, timeout=10) as client:
            return "reply: " + client.request(b"ping").decode()
    except ServerError as exc:
        return "error: " + exc.message


LOOPBACK_CLIENT = """
import sys
from muxsrv.client import Client
with Client("127.0.0.1", int(sys.argv[1]), timeout=10) as client:
    print(client.request(b"ping").decode())
"""


@needs_netns
def test_remote_peer_refused_loopback_served(netns: Netns) -> None:
    with server_in(netns, "--host", "0.0.0.0") as srv:
        assert "protected mode on" in srv.stderr_text()
        said = request(netns.inside, srv.port)
        assert said.startswith("error: protected mode:"), said
        assert "--auth-token-file" in said and "--no-protected-mode" in said
        done = netns.run(sys.executable, "-c", LOOPBACK_CLIENT, str(srv.port))
        assert done.returncode == 0 and done.stdout == "ping\n", done.stderr
        assert srv.stop() == 0
        assert "refusing 10.213." in srv.final_log()


@needs_netns
def test_no_protected_mode_serves_the_remote_peer(netns: Netns) -> None:
    with server_in(netns, "--host", netns.inside, "--no-protected-mode") as srv:
        assert "protected mode" not in srv.stderr_text()
        assert request(netns.inside, srv.port) == "reply: ping"


@needs_netns
def test_with_a_token_the_remote_peer_is_served_after_auth(
    netns: Netns, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    with server_in(netns, "--host", netns.inside, "--auth-token-file", str(tokens)) as srv:
        assert request(netns.inside, srv.port, TOKEN) == "reply: ping"
        assert request(netns.inside, srv.port) == "error: authentication required"


def through_balancer(ns: Netns, port: int, client: tuple[str, int]) -> tuple[bool, bytes]:
    """The test as a balancer outside the namespace: a PROXY header naming ``client``, ping."""
    with socket.create_connection((ns.inside, port), timeout=10) as sock:
        sock.sendall(v1_header(client, (ns.inside, port)) + frame(b"ping"))
        return recv_frame(sock)


@needs_netns
def test_behind_a_balancer_protected_mode_judges_the_header_address(netns: Netns) -> None:
    with server_in(netns, "--host", netns.inside, "--proxy-protocol",
                   "--proxy-from", f"{netns.outside}/32") as srv:
        assert "protected mode on" in srv.stderr_text()
        # The socket's peer is remote either way; only the header differs.
        assert through_balancer(netns, srv.port, ("127.0.0.1", 5000)) == (False, b"ping")
        refused, said = through_balancer(netns, srv.port, ("192.0.2.7", 5000))
        assert refused and said.startswith(b"protected mode:"), said
        srv.wait_log("closing 192.0.2.7:5000: protected mode")
        # A client inside the namespace is not in --proxy-from: closed at accept.
        code = LOOPBACK_CLIENT.replace('"127.0.0.1"', repr(netns.inside))
        done = netns.run(sys.executable, "-c", code, str(srv.port))
        assert done.returncode != 0, done.stdout
        srv.wait_log(f"refusing {re.escape(netns.inside)}:[0-9]+: not in --proxy-from")
        assert srv.stop() == 0


# -- without a network ----------------------------------------------------------------


def test_loopback_peers() -> None:
    for peer in (("127.0.0.1", 1), ("127.9.9.9", 1), ("::1", 1, 0, 0),
                 ("::ffff:127.0.0.1", 1, 0, 0), "/run/muxsrv.sock", ""):
        assert is_loopback_peer(peer), peer
    for peer in (("10.0.0.1", 1), ("::ffff:10.0.0.1", 1, 0, 0), ("2001:db8::1", 1, 0, 0),
                 ("fe80::1%eth0", 1, 0, 0)):
        assert not is_loopback_peer(peer), peer


def test_protected_gate_on_a_fake_socket() -> None:
    gate = Gate("length", None, protected=True)
    with Harness(function=bytes, gate=gate, peer=("192.0.2.1", 7)) as h:
        h.peer_sends(frame(b"hi"))
        h.run()
        [reply] = h.replies()
        assert isinstance(reply, ErrorFrame) and reply.text == PROTECTED_MODE
    with Harness(function=bytes, gate=gate) as h:  # 127.0.0.1
        h.peer_sends(frame(b"hi"))
        h.run()
        assert h.replies() == [b"hi"]


def test_exec_needs_a_token_for_a_remote_host() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "muxsrv", "--handler", "exec", "--host", "0.0.0.0",
         "--allow-remote-exec", "--port", "0"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "--auth-token-file" in lines[0]
