"""TLS together with the rest: --workers and SIGHUP, flow control and half-close, PROXY headers.

State-machine tests run one real Connection with its real stages (PROXY
header, TLS) over the fake socket and clock, a client SSLObject on memory
BIOs as the peer; the rest run a real server.  Addresses inside PROXY headers
are documentation addresses and are never connected to.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    PLUGINS,
    ServerProcess,
    frame,
    plugin_env,
    recv_frame,
    running_server,
    wait_for,
)
from tls_certs import Certs

from muxsrv.auth import PROTECTED_MODE, Gate
from muxsrv.handler import Conn, Handler
from muxsrv.proxying import Proxying
from muxsrv.stages.proxy import v1_header, v2_header
from muxsrv.stages.tls import TLSStage
from muxsrv.testing import Harness
from muxsrv.tls import load_context
from muxsrv.transport import HIGH_WATER
from tests.test_protected import Netns, server_in
from tests.test_protected import netns as netns  # the fixture, for getfixturevalue

pytestmark = pytest.mark.timeout(120)


class MemoryClient:
    """A TLS client on memory BIOs: bytes for the socket out, bytes from it in."""

    def __init__(self, context: ssl.SSLContext, name: str = "127.0.0.1") -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname=name)
        self.plaintext = bytearray()
        self.close_notified = False

    def hello(self) -> bytes:
        """Start the handshake: the ClientHello's bytes."""
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.do_handshake()
        return self.outgoing.read()

    def step(self) -> bool:
        """Go on with the handshake; True once done."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def out(self) -> bytes:
        return self.outgoing.read()

    def feed(self, data: bytes) -> None:
        """Ciphertext from the server; plaintext collects in ``plaintext``."""
        self.incoming.write(data)
        try:
            while chunk := self.obj.read(1 << 20):
                self.plaintext += chunk
            self.close_notified = True  # b"": the server's close_notify
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.close_notified = True

    def close_notify(self) -> bytes:
        """Our close_notify (a half-close in TLS 1.3: the server's replies may still come)."""
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.unwrap()
        return self.out()


def server_context(certs: Certs) -> ssl.SSLContext:
    return load_context(str(certs.server_cert), str(certs.server_key))


def sent_since(h: Harness, mark: list[int]) -> bytes:
    data = bytes(h.sock.sent[mark[0]:])
    mark[0] = len(h.sock.sent)
    return data


# -- b. half-close while reading is paused (flow control) ------------------------------


def test_close_notify_while_paused_every_reply_then_ours_fake(certs: Certs) -> None:
    """Bugs caught: the close_notify taken as the end before the replies still owed (or
    the requests still unread) are through; replies lost or reordered when reading
    resumes; no close_notify of ours at the end; the connection never closing."""
    client = MemoryClient(certs.client_context(ssl.TLSVersion.TLSv1_3))
    with Harness(function=lambda p: p, stages=[TLSStage(server_context(certs))]) as h:
        mark = [0]
        h.peer_sends(client.hello())
        for _ in range(10):
            h.run()
            client.feed(sent_since(h, mark))
            if client.step():
                break
            h.peer_sends(client.out())
        h.peer_sends(client.out())
        h.run()
        client.feed(sent_since(h, mark))
        messages = [bytes([i % 251]) * (60_000 + i) for i in range(80)]  # ~4.8 MB: 4 x HIGH_WATER
        requests = b"".join(frame(m) for m in messages)
        assert len(requests) > 4 * HIGH_WATER
        h.sock.capacity = 0  # a reader that reads nothing, for now
        client.obj.write(requests)
        wire = client.out() + client.close_notify()
        h.peer_sends(*[wire[i:i + 16384] for i in range(0, len(wire), 16384)])
        h.run()
        assert h.sock.readable, "the server read everything: reading never paused"
        assert not h.closed and not h.sock.shut_wr
        for _ in range(2000):  # the reader wakes up: 64 KiB at a time
            if h.closed:
                break
            h.sock.allow(65536)
            h.run()
            client.feed(sent_since(h, mark))
        assert h.closed == 1 and h.sock.shut_wr
        assert bytes(client.plaintext) == requests  # every reply, byte for byte, in order
        assert client.close_notified  # then the server's own close_notify
        assert h.sock.used_after_close == 0


def test_close_notify_while_paused_real_socket(certs: Certs) -> None:
    """The same over a real socket: 16 MiB pipelined by a client with small buffers that
    reads nothing until the server has stopped reading, then close_notify, then reads."""
    client = MemoryClient(certs.client_context(ssl.TLSVersion.TLSv1_3))
    messages = [bytes([i % 251]) * 65536 for i in range(256)]
    requests = b"".join(frame(m) for m in messages)
    with running_server("--tls-cert", str(certs.server_cert), "--tls-key",
                        str(certs.server_key)) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.settimeout(20)
        with sock:
            sock.connect(srv.address)
            sock.sendall(client.hello())
            while not client.step():
                client.feed(sock.recv(65536))
                sock.sendall(client.out())
            client.obj.write(requests)
            wire = client.out() + client.close_notify()
            sent = [0]

            def send() -> None:
                for i in range(0, len(wire), 65536):
                    sock.sendall(wire[i:i + 65536])
                    sent[0] = i + 65536

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            last = [-1]

            def stalled() -> bool:  # the server stopped reading: our sends stopped moving
                sender.join(0.2)
                moved, last[0] = sent[0] != last[0], sent[0]
                return not moved

            wait_for(stalled, timeout=30, interval=0, what="the sender to stall")
            assert sender.is_alive(), "all sent: the server never stopped reading"
            assert sent[0] < len(wire)
            while not client.close_notified:
                data = sock.recv(1 << 20)
                assert data, "EOF before the server's close_notify"
                client.feed(data)
            sender.join(20)
            assert not sender.is_alive()
        assert bytes(client.plaintext) == requests
        srv.wait_log("close_notify received \\(a clean close\\)")


# -- c. TLS behind a PROXY header ------------------------------------------------------


class PeerHandler(Handler):
    """``peer?`` gets repr(conn.peer); anything else its echo."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.send(repr(conn.peer).encode() if payload == b"peer?" else payload)


HEADERS = {
    "v1": (v1_header(("192.0.2.7", 56324), ("127.0.0.1", 9999)), ("192.0.2.7", 56324)),
    "v2": (v2_header(("2001:db8::7", 4433), ("2001:db8::1", 9999)), ("2001:db8::7", 4433, 0, 0)),
}


def proxied_tls_exchange(certs: Certs, header: bytes, cuts: list[int],
                         gate: Gate | None = None) -> tuple[MemoryClient, Harness]:
    """Header + ClientHello split at ``cuts`` (offsets into them), then the handshake
    and ``peer?``; the client and the (closed) harness."""
    client = MemoryClient(certs.client_context())
    first = header + client.hello()
    pieces = [first[a:b] for a, b in zip([0, *cuts], [*cuts, len(first)], strict=True)]
    h = Harness(PeerHandler, proxying=Proxying(), stages=[TLSStage(server_context(certs))],
                gate=gate)
    mark = [0]
    for piece in pieces:
        h.peer_sends(piece)
        h.run()
    for _ in range(10):
        client.feed(sent_since(h, mark))
        if client.step():
            break
        h.peer_sends(client.out())
        h.run()
    client.obj.write(frame(b"peer?") + frame(b"after"))
    h.peer_sends(client.out())
    h.run()
    client.feed(sent_since(h, mark))
    return client, h


@pytest.mark.parametrize("version", sorted(HEADERS))
def test_proxy_header_then_tls_split_everywhere(certs: Certs, version: str) -> None:
    """Bugs caught: ClientHello bytes that came in the header's segment lost (or taken
    for header); a header cut anywhere misparsed; conn.peer the socket's, not the header's."""
    header, peer = HEADERS[version]
    hello_size = len(MemoryClient(certs.client_context()).hello())
    total = len(header) + hello_size
    splits: list[list[int]] = [[], [len(header)], [len(header) - 1], [len(header) + 1],
                               [1], [total - 1], [len(header) - 1, len(header) + 1]]
    splits += [[cut] for cut in range(1, len(header) + 6)]
    expected = frame(repr(peer).encode()) + frame(b"after")
    for cuts in splits:
        client, h = proxied_tls_exchange(certs, header, cuts)
        try:
            assert bytes(client.plaintext) == expected, cuts
            assert h.conn.peer == peer
        finally:
            h.close()
    # And the whole first flight a byte at a time.
    client, h = proxied_tls_exchange(certs, header, list(range(1, total)))
    with h:
        assert bytes(client.plaintext) == expected


def test_behind_a_proxy_protected_mode_judges_the_header_inside_tls(certs: Certs) -> None:
    gate = Gate("length", None, protected=True)
    remote = v1_header(("192.0.2.7", 5000), ("127.0.0.1", 9999))
    client, h = proxied_tls_exchange(certs, remote, [], gate=gate)
    with h:
        # The refusal comes inside TLS, after the handshake, as an error frame.
        said = bytes(client.plaintext)
        assert said[4:] == PROTECTED_MODE.encode() and said[0] & 0x80, said[:60]
        assert client.close_notified and h.sock.shut_wr  # then a clean TLS close
        h.sock.peer_shuts_down()
        h.run()
        assert h.closed == 1
    local = v1_header(("127.0.0.1", 5000), ("127.0.0.1", 9999))
    client, h = proxied_tls_exchange(certs, local, [len(local) + 3], gate=gate)
    with h:
        assert bytes(client.plaintext) == frame(b"('127.0.0.1', 5000)") + frame(b"after")


def tls_through_proxy(srv: ServerProcess, certs: Certs, header: bytes,
                      name: str = "127.0.0.1") -> ssl.SSLSocket:
    sock = socket.create_connection(srv.address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(header)  # in plaintext, before the handshake
    return certs.client_context().wrap_socket(sock, server_hostname=name)


def test_proxy_protocol_with_tls_on_a_real_server(certs: Certs) -> None:
    with running_server("--handler", f"{PLUGINS}:Peers", "--proxy-protocol",
                        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                        env=plugin_env()) as srv:
        for header, peer in HEADERS.values():
            with tls_through_proxy(srv, certs, header) as sock:
                sock.sendall(frame(b"one") + frame(b"peer?"))
                assert recv_frame(sock) == (False, b"one")
                assert recv_frame(sock) == (False, repr(peer).encode())
        # A TLS client that sends no header: closed, as any missing header is.
        with socket.create_connection(srv.address, timeout=10) as sock, \
                pytest.raises((ssl.SSLError, OSError)):
            certs.client_context().wrap_socket(sock, server_hostname="127.0.0.1")
        srv.wait_log("bad PROXY protocol header")
        assert "Traceback" not in srv.stderr_text()


# -- a. SIGHUP under --workers -----------------------------------------------------------

PID_HANDLER = """
import os

def pid(payload: bytes) -> bytes:
    return str(os.getpid()).encode()
"""


def common_name(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert()
    assert cert is not None
    return next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")


@pytest.fixture
def reloadable(certs: Certs, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path, Path, Path]]:
    cert, key, tokens = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "tokens"
    cert.write_bytes(certs.server_cert.read_bytes())
    key.write_bytes(certs.server_key.read_bytes())
    tokens.write_text("old-token-0123456789abcdef\n")
    (tmp_path / "pidhandler.py").write_text(PID_HANDLER)
    env = {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    srv = ServerProcess(["--port", "0", "--workers", "2", "--handler", "pidhandler:pid",
                         "--tls-cert", str(cert), "--tls-key", str(key),
                         "--auth-token-file", str(tokens)], env=env)
    try:
        srv.wait_started()
        # Workers are fresh interpreters that read the files as they start: the files
        # may change only once the first generation has them.
        srv.wait_log("generation 1 serving", timeout=30)
        yield srv, cert, key, tokens
    finally:
        srv.stop()


def authenticated(srv: ServerProcess, certs: Certs, token: bytes) -> tuple[ssl.SSLSocket, bool]:
    sock = certs.client_context().wrap_socket(
        socket.create_connection(srv.address, timeout=10), server_hostname="127.0.0.1")
    sock.sendall(frame(b"AUTH " + token))
    return sock, recv_frame(sock) == (False, b"OK")


def ask_pid(sock: ssl.SSLSocket) -> int:
    sock.sendall(frame(b"pid"))
    error, payload = recv_frame(sock)
    assert not error, payload
    return int(payload)


def test_sighup_under_workers_rereads_certificate_and_tokens_everywhere(
        certs: Certs, reloadable: tuple[ServerProcess, Path, Path, Path]) -> None:
    """Bugs caught: a reload that leaves a worker on the old files (or on only one of
    them); a worker that re-reads the certificate but not the tokens; old connections
    reset instead of drained."""
    srv, cert, key, tokens = reloadable
    old: dict[int, ssl.SSLSocket] = {}  # one open connection per worker serving before
    try:
        def both_workers_before() -> bool:
            sock, ok = authenticated(srv, certs, b"old-token-0123456789abcdef")
            assert ok and common_name(sock) == "server"
            pid = ask_pid(sock)
            if pid in old:
                sock.close()
            else:
                old[pid] = sock
            return len(old) == 2

        wait_for(both_workers_before, timeout=30, interval=0, what="both workers to serve")
        cert.write_bytes(certs.server2_cert.read_bytes())
        key.write_bytes(certs.server2_key.read_bytes())
        tokens.write_text("new-token-0123456789abcdef\n")
        srv.signal(signal.SIGHUP)
        reloaded: set[int] = set()

        def both_workers_after() -> bool:
            sock, ok = authenticated(srv, certs, b"new-token-0123456789abcdef")
            with sock:
                if ok and common_name(sock) == "server2":
                    reloaded.add(ask_pid(sock))
            return len(reloaded) >= 2

        wait_for(both_workers_after, timeout=30, interval=0.01,
                 what="two workers with the new certificate and token")
        # Now that both have reloaded, every new connection has the new files.
        for _ in range(6):
            sock, ok = authenticated(srv, certs, b"new-token-0123456789abcdef")
            with sock:
                assert ok and common_name(sock) == "server2"
            sock, ok = authenticated(srv, certs, b"old-token-0123456789abcdef")
            with sock:
                assert not ok  # the old token is gone everywhere
        # Connections from before stay with the generation that accepted them, which
        # drains: each quiet one gets the goodbye at a message boundary (clients resend).
        for sock in old.values():
            assert common_name(sock) == "server"
            sock.settimeout(30)
            assert recv_frame(sock) == (True, b"server shutting down")
    finally:
        for sock in old.values():
            sock.close()



@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="needs root and the ip command (CI runs as root)")
def test_protected_mode_behind_a_proxy_on_a_real_tls_server(
        certs: Certs, request: pytest.FixtureRequest) -> None:
    """A real non-loopback listener (in a namespace of our own): the balancer (this test) is
    remote either way; the header's address decides, and the refusal comes inside TLS."""
    netns: Netns = request.getfixturevalue("netns")
    with server_in(netns, "--host", netns.inside, "--proxy-protocol",
                   "--proxy-from", f"{netns.outside}/32", "--tls-cert", str(certs.server_cert),
                   "--tls-key", str(certs.server_key)) as srv:
        assert "protected mode on" in srv.stderr_text()
        said = {}
        for client in (("127.0.0.1", 5000), ("192.0.2.7", 5000)):
            sock = socket.create_connection((netns.inside, srv.port), timeout=10)
            sock.sendall(v1_header(client, (netns.inside, srv.port)))
            with certs.client_context().wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(frame(b"ping"))
                said[client[0]] = recv_frame(tls)
        assert said["127.0.0.1"] == (False, b"ping")
        refused, text = said["192.0.2.7"]
        assert refused and text.startswith(b"protected mode:"), text
        srv.wait_log("closing 192.0.2.7:5000: protected mode")
        assert srv.stop() == 0


def test_a_worker_restarted_after_sighup_has_the_new_files_too(
        certs: Certs, reloadable: tuple[ServerProcess, Path, Path, Path]) -> None:
    """Bug caught: the files are loaded in the parent before the fork and only the running
    workers re-read them on SIGHUP, so a worker restarted later (after a crash) served the
    old certificate and took the token rotated out, again."""
    srv, cert, key, tokens = reloadable
    cert.write_bytes(certs.server2_cert.read_bytes())
    key.write_bytes(certs.server2_key.read_bytes())
    tokens.write_text("new-token-0123456789abcdef\n")
    srv.signal(signal.SIGHUP)
    reloaded: set[int] = set()

    def both_reloaded() -> bool:
        sock, ok = authenticated(srv, certs, b"new-token-0123456789abcdef")
        with sock:
            if ok and common_name(sock) == "server2":
                reloaded.add(ask_pid(sock))
        return len(reloaded) >= 2

    wait_for(both_reloaded, timeout=30, interval=0.01, what="both workers to reload")
    victim = min(reloaded)
    os.kill(victim, signal.SIGKILL)  # a worker of the server this test started
    fresh: set[int] = set()

    def a_fresh_worker_serves() -> bool:
        try:  # (connections queued at the killed worker are reset)
            sock, ok = authenticated(srv, certs, b"new-token-0123456789abcdef")
        except OSError:
            return False
        with sock:
            if ok and common_name(sock) == "server2":
                pid = ask_pid(sock)
                if pid not in reloaded:
                    fresh.add(pid)
        return bool(fresh)

    wait_for(a_fresh_worker_serves, timeout=30, interval=0.01,
             what="the restarted worker to serve the new certificate and token")
    # And none, old or new, takes the old token any more.
    for _ in range(8):
        sock, ok = authenticated(srv, certs, b"old-token-0123456789abcdef")
        with sock:
            assert not ok
