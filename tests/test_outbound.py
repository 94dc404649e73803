"""Outbound connections (``conn.loop.connect``) and the README's ``forward`` example.

The connect's outcomes over real sockets on 127.0.0.1 (refused, connected, an
error frame, a server that dies mid-reply), the timeout over a fake socket and
clock, and ``Forward`` in-process between two servers on one loop (a slow
backend pauses the client) and as the README runs it, in two processes.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import socket
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from support import ROOT, frame, running_server

from muxsrv import outbound
from muxsrv.client import Client, ServerError
from muxsrv.errors import ConnectionClosed
from muxsrv.framing import ErrorFrame, LengthDecoder
from muxsrv.handler import Conn, Handler
from muxsrv.loop import EventLoop
from muxsrv.server import Server, Settings
from muxsrv.testing import FakeClock, FakeSelector, FakeSocket

README = (ROOT / "README.md").read_text(encoding="utf-8")


class Recorder(Handler):
    """Records the calls, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def connection_made(self, conn: Conn) -> None:
        self.events.append("made")

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self.events.append(payload)

    def eof_received(self, conn: Conn) -> None:
        self.events.append("eof")

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        self.events.append(("lost", exc))

    @property
    def lost(self) -> bool:
        return any(isinstance(e, tuple) for e in self.events)


class ErrorAware(Recorder):
    def error_received(self, conn: Conn, error: ServerError) -> None:
        self.events.append(("error", error.message))


@pytest.fixture
def loop() -> Any:
    loop = EventLoop()
    yield loop
    loop.close()


def closed_port() -> int:
    """A port on 127.0.0.1 that was just bound and closed: nothing listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_connect_reaches_connection_lost_from_the_loop(loop: EventLoop) -> None:
    h = Recorder()
    conn = loop.connect("127.0.0.1", closed_port(), h)
    conn.send(b"queued")  # queued while connecting; dropped with the connection
    assert h.events == []  # never inside connect()
    assert loop.run_until(lambda: h.lost, 5)
    [(_, exc)] = h.events  # no connection_made before it, and once
    assert isinstance(exc, ConnectionRefusedError)
    loop.run_once(max_wait=0.01)
    assert len(h.events) == 1 and not outbound.connector_of(loop).conns


def test_names_are_refused_at_the_call(loop: EventLoop) -> None:
    with pytest.raises(ValueError, match="not a numeric address"):
        loop.connect("example.invalid", 80, Recorder())
    assert not outbound.connector_of(loop).conns


def test_a_bad_port_or_a_failing_start_leaves_nothing_behind(loop: EventLoop) -> None:
    """Bug caught: connect_ex raising (a port out of range) left the socket open and the
    connection in the connector, so the server waited for it at shutdown."""
    for port in (0, 70000):
        with pytest.raises(ValueError, match="a port is from 1 to 65535"):
            loop.connect("127.0.0.1", port, Recorder())

    class Failing(socket.socket):
        def connect_ex(self, address: Any) -> int:
            raise OSError(errno.EPERM, "not today")

    sock = Failing(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(OSError, match="not today"):
        outbound.connect(loop, "127.0.0.1", 9, Recorder(), sock=sock)
    assert sock.fileno() == -1 and not outbound.connector_of(loop).conns


def test_connects_sends_what_was_queued_and_reads_replies(loop: EventLoop) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        h = Recorder()
        conn = loop.connect("localhost", listener.getsockname()[1], h)
        conn.send(b"one")
        conn.send(b"two")
        assert loop.run_until(lambda: h.events, 5) and h.events == ["made"]
        peer, _ = listener.accept()
    with peer:
        peer.settimeout(5)
        assert peer.recv(100) == frame(b"one") + frame(b"two")
        peer.sendall(frame(b"r1") + frame(b"r2"))
        assert loop.run_until(lambda: len(h.events) == 3, 5)
        peer.shutdown(socket.SHUT_WR)
        assert loop.run_until(lambda: h.lost, 5)
    assert h.events == ["made", b"r1", b"r2", "eof", ("lost", None)]


@pytest.mark.parametrize("aware", [False, True])
def test_an_error_frame_is_an_error(loop: EventLoop, aware: bool) -> None:
    h = ErrorAware() if aware else Recorder()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        loop.connect("127.0.0.1", listener.getsockname()[1], h)
        peer, _ = listener.accept()
    with peer:
        peer.sendall(frame(b"a") + b"\x80\x00\x00\x04oops" + frame(b"b"))
        assert loop.run_until(lambda: len(h.events) >= 3, 5)
        if aware:  # in order with the replies, and the connection goes on
            assert h.events == ["made", b"a", ("error", "oops"), b"b"]
            return
        assert loop.run_until(lambda: h.lost, 5)
    assert h.events[:2] == ["made", b"a"]
    [(_, exc)] = h.events[2:]
    assert isinstance(exc, ServerError) and exc.message == "oops"


def test_a_server_that_dies_mid_reply(loop: EventLoop) -> None:
    h = Recorder()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        loop.connect("127.0.0.1", listener.getsockname()[1], h)
        peer, _ = listener.accept()
    with peer:
        peer.sendall(frame(b"whole") + frame(b"0123456789")[:7])
    assert loop.run_until(lambda: h.lost, 5)
    assert h.events[:2] == ["made", b"whole"]
    [(_, exc)] = h.events[2:]
    assert isinstance(exc, ConnectionClosed) and "middle of a reply" in str(exc)


class ConnectingSocket(FakeSocket):
    """A fake socket whose connect finishes when the test says (or never)."""

    def __init__(self) -> None:
        super().__init__()
        self.connected = False
        self.error = 0
        self.address: Any = None

    def connect_ex(self, address: Any) -> int:
        self.address = address
        return errno.EINPROGRESS

    def getsockopt(self, *args: Any) -> int:
        return self.error

    @property
    def readable(self) -> bool:
        return self.connected and super().readable

    @property
    def writable(self) -> bool:
        return self.connected or bool(self.error)


def settle(loop: EventLoop, selector: FakeSelector, clock: FakeClock, seconds: float) -> None:
    selector.until = clock.now + seconds
    for _ in range(10_000):
        loop.run_once()
        if selector.settled:
            break
    selector.until = None


def test_a_connect_that_takes_too_long_times_out() -> None:
    clock = FakeClock()
    selector = FakeSelector(clock)
    loop = EventLoop(selector=selector, clock=clock)
    sock = ConnectingSocket()
    h = Recorder()
    outbound.connect(loop, "127.0.0.1", 9, h, timeout=5.0, sock=sock)
    assert sock.address == ("127.0.0.1", 9)
    settle(loop, selector, clock, 4.9)
    assert h.events == [] and not sock.closed
    settle(loop, selector, clock, 0.2)
    [(_, exc)] = h.events
    assert isinstance(exc, TimeoutError) and "timed out after 5 s" in str(exc)
    assert sock.closed and sock.used_after_close == 0
    loop.close()


def test_a_fake_connect_that_succeeds_then_is_reset() -> None:
    clock = FakeClock()
    selector = FakeSelector(clock)
    loop = EventLoop(selector=selector, clock=clock)
    sock = ConnectingSocket()
    h = Recorder()
    conn = outbound.connect(loop, "::1", 9, h, timeout=5.0, sock=sock)
    conn.send(b"early")
    settle(loop, selector, clock, 1)
    assert h.events == [] and sock.sent == b""  # nothing leaves before the connect
    sock.connected = True
    settle(loop, selector, clock, 10)  # well past the timeout: it was cancelled
    assert h.events == ["made"] and bytes(sock.sent) == frame(b"early")
    sock.peer_resets()
    settle(loop, selector, clock, 1)
    assert h.events[0] == "made" and isinstance(h.events[1][1], ConnectionResetError)
    assert len(h.events) == 2
    loop.close()


# -- the README's forward example ------------------------------------------------


def forward_code() -> str:
    for code in re.findall(r"```python\n(.*?)```", README, re.S):
        if code.startswith("# forward.py"):
            return str(code)
    raise AssertionError("no forward.py block in the README")


def load_forward(tmp_path: Path) -> ModuleType:
    path = tmp_path / "forward.py"
    path.write_text(forward_code())
    spec = importlib.util.spec_from_file_location("forward_example", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop("forward_example", None)
    spec.loader.exec_module(module)
    return module


class SlowUpper(Handler):
    """A slow backend: each reply leaves 5 ms after its message; counts what is in flight."""

    in_flight = 0
    most = 0

    def message_received(self, conn: Conn, payload: bytes) -> None:
        cls = SlowUpper
        cls.in_flight += 1
        cls.most = max(cls.most, cls.in_flight)
        conn.loop.call_later(0.005, self.reply, conn, payload)

    def reply(self, conn: Conn, payload: bytes) -> None:
        SlowUpper.in_flight -= 1
        conn.send(payload.upper())


def serve(loop: EventLoop, **kw: Any) -> tuple[Server, int]:
    server = Server(loop, Settings(port=0, idle_timeout=0), **kw)
    [(_, port)] = server.listen(socket.create_server(("127.0.0.1", 0)))
    return server, port


class Reader:
    """A client socket read without blocking while the loop runs in this thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.data = b""
        self.eof = False

    def got(self, n: int) -> bool:
        try:
            chunk = self.sock.recv(1 << 16)
            self.data += chunk
            self.eof = not chunk
        except BlockingIOError:
            pass
        return self.eof or len(self.data) >= n


def test_forward_pauses_its_client_while_the_backend_is_slow(
    tmp_path: Path, loop: EventLoop
) -> None:
    fwd = load_forward(tmp_path)
    _backend, bport = serve(loop, factory=SlowUpper)
    SlowUpper.most = SlowUpper.in_flight = 0
    pauses: list[int] = []

    class Watched(fwd.Forward):  # type: ignore[name-defined,misc]
        backend_address = ("127.0.0.1", bport)
        window = 4

        def pace(self) -> None:
            was = self.paused
            super().pace()
            if self.paused and not was:
                pauses.append(self.waiting)

    _front, fport = serve(loop, factory=Watched)
    messages = [b"m%02d" % i for i in range(40)]
    with socket.create_connection(("127.0.0.1", fport), timeout=5) as sock:
        sock.sendall(b"".join(frame(m) for m in messages))
        reader = Reader(sock)
        want = sum(len(frame(m)) for m in messages)
        assert loop.run_until(lambda: reader.got(want), 10)
    assert reader.data == b"".join(frame(m.upper()) for m in messages)  # all, in order
    assert SlowUpper.most == 4  # the window was reached, never passed
    assert pauses and all(w == 4 for w in pauses)


def test_forward_answers_what_a_dying_backend_left_unanswered(
    tmp_path: Path, loop: EventLoop
) -> None:
    fwd = load_forward(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as backend:

        class ToDying(fwd.Forward):  # type: ignore[name-defined,misc]
            backend_address = ("127.0.0.1", backend.getsockname()[1])

        _front, fport = serve(loop, factory=ToDying)
        with socket.create_connection(("127.0.0.1", fport), timeout=5) as sock:
            sock.sendall(frame(b"a") + frame(b"b") + frame(b"c"))
            got = b""

            def backend_has_all() -> bool:
                nonlocal got
                peer.settimeout(0.001)
                with suppress(TimeoutError, BlockingIOError):
                    got += peer.recv(100)
                return got == frame(b"a") + frame(b"b") + frame(b"c")

            assert loop.run_until(lambda: _accepted(backend), 5)
            peer = _accepted(backend)
            assert loop.run_until(backend_has_all, 5)
            peer.sendall(frame(b"A") + frame(b"BBBBB")[:6])  # dies in the middle of "b"'s reply
            peer.close()
            reader = Reader(sock)
            assert loop.run_until(lambda: reader.got(1 << 30), 5)  # until the client's EOF
    decoded = LengthDecoder(1 << 20, accept_errors=True).feed(reader.data)
    assert decoded[0] == b"A"  # the one reply that came whole; then an error for each other
    lost = (f"backend lost: 127.0.0.1:{ToDying.backend_address[1]} closed the connection "
            "in the middle of a reply (6 bytes of it received)")
    assert [type(m) for m in decoded[1:]] == [ErrorFrame, ErrorFrame]
    assert [m.text for m in decoded[1:] if isinstance(m, ErrorFrame)] == [lost, lost]


_accepted_socks: dict[int, socket.socket] = {}


def _accepted(listener: socket.socket) -> socket.socket | None:
    """The connection accepted on ``listener`` (polled without blocking)."""
    found = _accepted_socks.get(listener.fileno())
    if found is None:
        listener.setblocking(False)
        try:
            found, _ = listener.accept()
        except BlockingIOError:
            return None
        _accepted_socks[listener.fileno()] = found
    return found


def test_forward_example_runs(tmp_path: Path) -> None:
    (tmp_path / "forward.py").write_text(forward_code())
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    with running_server("--handler", "upper") as backend:
        to = f"127.0.0.1:{backend.port}"
        front = running_server("--handler", "forward:Forward", "--forward-to", to, env=env)
        with front as srv, Client(*srv.address) as c:
            assert c.request(b"hello") == b"HELLO"
            assert c.pipeline([b"a", b"b", b"c"] * 50) == [b"A", b"B", b"C"] * 50
    to = f"127.0.0.1:{closed_port()}"
    with running_server("--handler", "forward:Forward", "--forward-to", to, env=env) as front:
        with Client(*front.address, resend=False) as c, pytest.raises(ServerError) as err:
            c.request(b"hello")
        assert err.value.message.startswith("backend lost: ")
        assert "refused" in err.value.message


def test_outbound_connections_are_not_the_servers_and_end_with_it(loop: EventLoop) -> None:
    """Bugs caught: outbound connections counted as accepted ones (--max-conns, the drain
    waiting for them), or left open, their handler never told, when the server stops."""
    backends: list[Recorder] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        bport = listener.getsockname()[1]

        class Opener(Handler):
            def connection_made(self, conn: Conn) -> None:
                for _ in range(2):  # kept open: the server has to end them
                    backends.append(Recorder())
                    conn.loop.connect("127.0.0.1", bport, backends[-1])

        server = Server(loop, Settings(port=0, idle_timeout=0, max_conns=1), factory=Opener)
        [(_, port)] = server.listen(socket.create_server(("127.0.0.1", 0)))
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            assert loop.run_until(lambda: [b.events for b in backends] == [["made"]] * 2, 5)
            assert len(server._conns) == 1  # max_conns=1 and both outbound connections made
            server.shutdown()
        t0 = loop.time()
        server.run()  # the client left: the drain ends; the outbound ones are aborted
        assert loop.time() - t0 < 5
    assert [b.events for b in backends] == [["made", ("lost", None)]] * 2
    assert not outbound.connector_of(loop).conns


def test_a_failing_handler_closes_its_outbound_connection_without_an_error_frame(
    loop: EventLoop,
) -> None:
    """Bug caught: an error frame sent toward a server, which has no such channel (its
    decoder takes the flagged length word for a frame too large)."""

    class Failing(Recorder):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            raise RuntimeError("bug in the handler")

    h = Failing()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        loop.connect("127.0.0.1", listener.getsockname()[1], h)
        peer, _ = listener.accept()
    with peer:
        peer.settimeout(5)
        peer.sendall(frame(b"x"))
        sock = outbound.connector_of(loop).conns
        assert loop.run_until(lambda: all(c.closing for c in sock), 5)
        assert peer.recv(100) == b""  # a clean close, and nothing sent before it
    assert loop.run_until(lambda: h.lost, 5)  # (the peer closed: the linger ends)
    assert h.events == ["made", ("lost", None)]


@pytest.mark.timeout(120)
def test_forward_example_passes_mypy_strict(tmp_path: Path) -> None:
    """Bug caught: ``conn.loop.connect`` or ``error_received`` untyped for plugin authors."""
    (tmp_path / "forward.py").write_text(forward_code())
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "forward.py"],
        cwd=tmp_path, env={**os.environ, "MYPYPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr
