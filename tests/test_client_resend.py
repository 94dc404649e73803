"""The client's answer to a server's goodbye: reconnect, resend what was not answered.

A draining server ends a connection with the error frame ``server shutting
down`` at a message boundary: everything sent before it was answered and
nothing after it was read.  A scripted stand-in on 127.0.0.1 plays such a
server exactly (answer these, say goodbye, let the next connection answer the
rest) and records what each connection received; the last test restarts a
real muxsrv on the same port under a busy client.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from contextlib import suppress

import pytest
from support import ServerProcess, frame, recv_exact, recv_frame, wait_for

from muxsrv.client import Client, ServerError, ServerGone

pytestmark = pytest.mark.timeout(60)
GOODBYE = "server shutting down"


def error_frame(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">I", 0x80000000 | len(data)) + data


def answer(payload: bytes) -> bytes:
    return b"re:" + payload


# -- a scripted server ---------------------------------------------------------------

# script(server, connection, what it has received): runs for one accepted connection.
Script = Callable[["ScriptedServer", socket.socket, list[bytes]], None]


class ScriptedServer:
    """Accepts one connection per script, in order, and runs it; then stops listening
    (before the last script runs, so a reconnect after it is refused)."""

    def __init__(self, *scripts: Script) -> None:
        self._scripts = scripts
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        #: What each connection received, in accept order.
        self.received: list[list[bytes]] = []
        #: Set once the goodbye of any connection has been sent.
        self.said_goodbye = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._listener.settimeout(20)
            for n, script in enumerate(self._scripts):
                conn, _ = self._listener.accept()
                if n == len(self._scripts) - 1:
                    self._listener.close()
                received: list[bytes] = []
                self.received.append(received)
                with conn:
                    conn.settimeout(20)
                    script(self, conn, received)
        except BaseException as exc:  # reported by join()
            self.failure = exc
        finally:
            self._listener.close()

    def join(self) -> None:
        self._thread.join(30)
        assert not self._thread.is_alive(), "the scripted server did not finish"
        assert self.failure is None, f"scripted server failed: {self.failure!r}"


def goodbye(read: int, answered: int) -> Script:
    """Read ``read`` messages, answer the first ``answered``, say goodbye, then linger
    (read and drop whatever else comes) until the client closes."""

    def script(server: ScriptedServer, conn: socket.socket, received: list[bytes]) -> None:
        for _ in range(read):
            (size,) = struct.unpack(">I", recv_exact(conn, 4))
            received.append(recv_exact(conn, size))
        conn.sendall(b"".join(frame(answer(p)) for p in received[:answered]))
        conn.sendall(error_frame(GOODBYE))
        conn.shutdown(socket.SHUT_WR)
        server.said_goodbye.set()
        with suppress(OSError):
            while conn.recv(1 << 16):  # ends at the client's close
                pass

    return script


def answer_all(server: ScriptedServer, conn: socket.socket, received: list[bytes]) -> None:
    """Answer every message until the client closes."""
    while True:
        try:
            (size,) = struct.unpack(">I", recv_exact(conn, 4))
        except ConnectionError:
            return
        payload = recv_exact(conn, size)
        received.append(payload)
        conn.sendall(frame(answer(payload)))


# -- against the scripted server -------------------------------------------------------


def test_pipeline_resends_exactly_the_unanswered_requests() -> None:
    """Bug caught: the goodbye raised as an error, replies lost or duplicated, requests
    that were answered sent again, or the unanswered ones resent out of order."""
    msgs = [b"m%d" % i for i in range(10)]
    srv = ScriptedServer(goodbye(read=10, answered=4), answer_all)
    with Client("127.0.0.1", srv.port) as c:
        assert c.pipeline(msgs) == [answer(m) for m in msgs]
        assert c.reconnects == 1
        assert c.request(b"after") == answer(b"after")  # the new connection goes on
    srv.join()
    assert srv.received == [msgs, [*msgs[4:], b"after"]]


def test_goodbye_between_requests_resends_only_the_next() -> None:
    """Bug caught: a goodbye that arrived while the client was idle ignored (the next
    request failing), or an answered request resent with the unanswered one."""
    srv = ScriptedServer(goodbye(read=1, answered=1), answer_all)
    with Client("127.0.0.1", srv.port) as c:
        assert c.request(b"a") == answer(b"a")
        srv.said_goodbye.wait(10)
        assert c.request(b"b") == answer(b"b")  # sent to the old connection, then resent
        c.send(b"c")
        c.send(b"d")
        assert (c.recv(), c.recv()) == (answer(b"c"), answer(b"d"))
        assert c.reconnects == 1
    srv.join()
    assert srv.received == [[b"a"], [b"b", b"c", b"d"]]


def test_goodbye_in_the_middle_of_a_large_pipeline() -> None:
    """Bug caught: the goodbye read while still sending (10 MB, more than the socket
    buffers hold) and the rest of the send going to the dead connection, or the
    resend starting from where the send had got to instead of the first unanswered."""
    msgs = [bytes([i]) * 100_000 for i in range(100)]
    srv = ScriptedServer(goodbye(read=3, answered=3), answer_all)
    with Client("127.0.0.1", srv.port, timeout=20) as c:
        assert c.pipeline(msgs) == [answer(m) for m in msgs]
        assert c.reconnects == 1
    srv.join()
    assert srv.received[0] == msgs[:3]
    assert srv.received[1] == msgs[3:]


def test_two_goodbyes_in_a_row() -> None:
    """Bug caught: a second goodbye (the next server draining too) not handled, or the
    give-up deadline not reset by the replies in between."""
    msgs = [b"m%d" % i for i in range(6)]
    srv = ScriptedServer(goodbye(read=6, answered=2), goodbye(read=1, answered=0), answer_all)
    with Client("127.0.0.1", srv.port) as c:
        assert c.pipeline(msgs) == [answer(m) for m in msgs]
        assert c.reconnects == 2
    srv.join()
    assert srv.received == [msgs, msgs[2:3], msgs[2:]]


def test_no_server_comes_back_raises_server_gone() -> None:
    """Bug caught: reconnecting forever, or a bare ConnectionRefusedError."""
    srv = ScriptedServer(goodbye(read=2, answered=1))
    with Client("127.0.0.1", srv.port, reconnect_timeout=0.5) as c:
        start = time.monotonic()
        with pytest.raises(ServerGone, match=r"within 0.5 s: .*; 1 request\(s\) unanswered"):
            c.pipeline([b"a", b"b"])
        assert time.monotonic() - start < 5
        assert c.reconnects == 0
    srv.join()


def test_resend_off_raises_the_goodbye() -> None:
    """Bug caught: resend=False ignored (a handler with per-connection state would get
    a fresh connection without the caller knowing)."""
    srv = ScriptedServer(goodbye(read=2, answered=1))
    with Client("127.0.0.1", srv.port, resend=False) as c:
        with pytest.raises(ServerError, match=GOODBYE):
            c.pipeline([b"a", b"b"])
        assert c.reconnects == 0
    srv.join()


def test_other_error_frames_are_not_resent() -> None:
    """Bug caught: any error frame taken for a goodbye (a resend the server never
    promised was safe)."""

    def refuse_second(server: ScriptedServer, conn: socket.socket, received: list[bytes]) -> None:
        for n in range(3):
            received.append(recv_frame(conn)[1])
            conn.sendall(error_frame("nope") if n == 1 else frame(answer(received[-1])))

    srv = ScriptedServer(refuse_second)
    with Client("127.0.0.1", srv.port) as c:
        assert c.request(b"a") == answer(b"a")
        with pytest.raises(ServerError, match="nope"):
            c.request(b"b")
        assert c.request(b"c") == answer(b"c")
        assert c.reconnects == 0
    srv.join()
    assert srv.received == [[b"a", b"b", b"c"]]


# -- a real server restarted under a busy client ----------------------------------------


def test_busy_client_rides_out_a_restart_on_the_same_port() -> None:
    """Bug caught: requests lost, duplicated or reordered across a real server's
    SIGTERM drain and a new server on the same port."""
    first = ServerProcess(["--port", "0", "--handler", "upper", "--drain-timeout", "1"])
    servers = [first]
    sent: list[bytes] = []
    got: list[bytes] = []
    outcome: dict[str, object] = {}

    def work(port: int) -> None:
        try:
            with Client("127.0.0.1", port, reconnect_timeout=30) as c:
                after = None  # iterations left once reconnected
                for i in range(1_000_000):  # bounded; ends 200 iterations after the restart
                    if i % 2:
                        batch = [b"r%d" % i]
                        sent.extend(batch)
                        got.append(c.request(batch[0]))
                    else:
                        batch = [b"p%d-%d" % (i, j) for j in range(20)]
                        sent.extend(batch)
                        got.extend(c.pipeline(batch))
                    if c.reconnects and after is None:
                        after = 200
                    if after is not None:
                        after -= 1
                        if after == 0:
                            break
                outcome["reconnects"] = c.reconnects
        except BaseException as exc:
            outcome["error"] = exc

    try:
        first.wait_started()
        port = first.port
        worker = threading.Thread(target=work, args=(port,), daemon=True)
        worker.start()
        wait_for(lambda: len(got) > 500 or not worker.is_alive(), what="the client under way")
        first.signal(signal.SIGTERM)
        assert first.wait(15) == 0, first.stderr_text()
        assert worker.is_alive(), f"the client stopped before the restart: {outcome}"
        second = ServerProcess(["--port", str(port), "--handler", "upper"])
        servers.append(second)
        second.wait_started()
        worker.join(30)
        assert not worker.is_alive(), "the client did not finish after the restart"
    finally:
        for srv in servers:
            with suppress(Exception):
                srv.stop()
    assert "error" not in outcome, outcome
    assert outcome["reconnects"] == 1
    assert got == [m.upper() for m in sent]
    assert "shutting down: draining 1 connections" in first.stderr_text()
