"""``Client(..., transport="udp")`` and ``muxsrv-client --udp``: one datagram per message,
one request in flight, a timeout and retries for lost ones."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from support import ROOT, running_server

from muxsrv.client import Client
from muxsrv.client_udp import UdpClient


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    with running_server("--udp-only", "--handler", "upper") as srv:
        yield srv.address


class LossyPeer:
    """A UDP 'server' on a thread: answers ``reply(n, payload)`` to the n-th datagram
    (a list of datagrams; empty: lost)."""

    def __init__(self, reply: Callable[[int, bytes], list[bytes]]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.address = self.sock.getsockname()
        self.received: list[bytes] = []
        self._reply = reply
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, sender = self.sock.recvfrom(70_000)
            except OSError:
                return
            if data == b"STOP":
                return
            self.received.append(data)
            for out in self._reply(len(self.received), data):
                self.sock.sendto(out, sender)

    def close(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"STOP", self.address)
        self._thread.join(10)
        self.sock.close()


def test_transport_udp_makes_a_udp_client(server: tuple[str, int]) -> None:
    with Client(*server, transport="udp") as c:
        assert isinstance(c, UdpClient)
        assert c.request(b"hello") == b"HELLO"
        assert c.request(b"") == b""
        assert c.pipeline([b"a", b"b\nc"]) == [b"A", b"B\nC"]
        big = b"x" * 65_507
        assert c.request(big) == big.upper()
        with pytest.raises(ValueError, match="at most 65,507 bytes"):
            c.request(b"x" * 65_508)
        assert c.resent == 0


def test_unknown_transport_and_tcp_only_options() -> None:
    with pytest.raises(ValueError, match="unknown transport 'sctp'"):
        Client("127.0.0.1", 1, transport="sctp")
    with pytest.raises(ValueError, match="TLS"):
        Client("127.0.0.1", 1, transport="udp", tls=True)


def test_lost_datagrams_are_sent_again() -> None:
    peer = LossyPeer(lambda n, data: [] if n <= 2 else [data[::-1]])
    try:
        with Client(*peer.address, transport="udp", timeout=0.2, retries=2) as c:
            assert c.request(b"abc") == b"cba"
            assert isinstance(c, UdpClient) and c.resent == 2
        assert peer.received == [b"abc"] * 3
    finally:
        peer.close()


def test_timeout_after_the_retries() -> None:
    peer = LossyPeer(lambda n, data: [])
    try:
        with Client(*peer.address, transport="udp", timeout=0.1, retries=1) as c, \
                pytest.raises(TimeoutError, match=r"no reply after 2 tries of 0\.1 s"):
            c.request(b"abc")
        assert peer.received == [b"abc"] * 2
    finally:
        peer.close()


def test_late_replies_do_not_pass_for_the_next() -> None:
    # The first request is answered twice (a duplicate, or a retry's late reply).
    peer = LossyPeer(lambda n, data: [data + b"1", data + b"2"] if n == 1 else [data])
    try:
        with Client(*peer.address, transport="udp", timeout=2) as c:
            assert c.request(b"a") == b"a1"
            # Wait (with a deadline) until the duplicate is there, unread: what is tested.
            assert select.select([c._sock], [], [], 5)[0]
            assert c.request(b"b") == b"b"
    finally:
        peer.close()


def run_client(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "muxsrv.client", *args], cwd=ROOT,
                          capture_output=True, input=stdin, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_cli_udp(server: tuple[str, int]) -> None:
    out = run_client("--udp", "--port", str(server[1]), "hello", "world")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"HELLO\nWORLD\n"
    out = run_client("--udp", "--port", str(server[1]), stdin=b"one\ntwo\n")
    assert out.stdout == b"ONE\nTWO\n"


def test_cli_udp_lost() -> None:
    peer = LossyPeer(lambda n, data: [])
    try:
        out = run_client("--udp", "--port", str(peer.address[1]), "--timeout", "0.1",
                         "--retries", "3", "hello")
        assert out.returncode == 1
        assert b"no reply after 4 tries of 0.1 s" in out.stderr
        assert peer.received == [b"hello"] * 4
    finally:
        peer.close()


def test_cli_udp_goes_on_after_a_lost_message() -> None:
    peer = LossyPeer(lambda n, data: [] if n == 1 else [data[::-1]])
    try:
        out = run_client("--udp", "--port", str(peer.address[1]), "--timeout", "0.1",
                         "--retries", "0", "first", "second")
        assert out.returncode == 1  # one was lost
        assert b"no reply after 1 try of 0.1 s" in out.stderr
        assert out.stdout == b"dnoces\n"
    finally:
        peer.close()


@pytest.mark.parametrize(("args", "said"), [
    (["--udp", "--exec", "ls"], b"--udp cannot go with --exec"),
    (["--udp", "--tls"], b"--udp cannot go with --tls"),
    (["--retries", "2", "x"], b"--retries is for --udp"),
    (["--udp", "--retries", "-1"], b"--retries"),
])
def test_cli_mistakes(args: list[str], said: bytes) -> None:
    out = run_client(*args)
    assert out.returncode == 2
    assert said in out.stderr
