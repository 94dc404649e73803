"""Limits on real sockets: --max-frame, --max-conns, --idle-timeout, running out of descriptors."""

from __future__ import annotations

import re
import resource
import socket
import time

import pytest
from support import (
    PLUGINS,
    frame,
    plugin_env,
    recv_frame,
    recv_until_eof,
    running_server,
    wait_for,
)

MiB = 1 << 20


def peer_text(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def request(sock: socket.socket, payload: bytes) -> tuple[bool, bytes]:
    sock.sendall(frame(payload))
    return recv_frame(sock)


# -- --max-frame ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("word", [0xFFFFFFFF, 1001])
def test_oversized_frame(word: int) -> None:
    """Bugs caught: replies before the bad prefix lost; bytes after it handed to the handler;
    no error frame or no close; the prefix buffered (a 4 GiB claim costing memory); one bad
    client disturbing others; no warning naming the peer."""
    with running_server(
        "--handler", f"{PLUGINS}:recorder", "--max-frame", "1000", env=plugin_env()
    ) as srv, srv.connect() as other, srv.connect() as bad:
        assert request(other, b"before") == (False, b"before")
        base = srv.rss_bytes()
        smuggled = frame(b"SMUGGLED") * 100
        bad.sendall(frame(b"one") + frame(b"x" * 1000) + word.to_bytes(4, "big") + smuggled)
        data = recv_until_eof(bad)  # the close must come: a hang fails on the timeout
        expect = frame(b"one") + frame(b"x" * 1000)
        assert data[: len(expect)] == expect
        error = f"frame of {word} bytes exceeds the limit of 1000 bytes".encode()
        assert data[len(expect) :] == (0x80000000 | len(error)).to_bytes(4, "big") + error
        srv.wait_log(rf"WARNING: closing {re.escape(peer_text(bad))}: frame of {word} bytes")
        assert srv.rss_bytes() - base < 8 * MiB
        assert request(other, b"after") == (False, b"after")
        assert "SMUGGLED" not in srv.stderr_text()
        srv.wait_log(r"handler got 5 bytes: b'after'")  # the log may lag the reply
        assert srv.log_count("handler got") == 4  # before, one, x*1000, after: only those


@pytest.mark.timeout(60)
def test_overlong_line_closes_without_reply() -> None:
    """Bug caught: an endless line buffered without limit, or answered after the violation."""
    with running_server("--handler", "upper", "--framing", "line", "--max-frame", "10") as srv:
        with srv.connect() as sock:
            sock.sendall(b"ok\n" + b"y" * 11 + b"\nnever\n")
            assert recv_until_eof(sock) == b"OK\n"
        srv.wait_log(r"WARNING: closing 127\.0\.0\.1:\d+: line of 11 bytes exceeds")
        # An unterminated last line over the limit, cut off by EOF: no reply, a warning.
        with srv.connect() as sock:
            peer = re.escape(peer_text(sock))
            sock.sendall(b"ok\n" + b"z" * 11)
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b"OK\n"
        srv.wait_log(rf"WARNING: closing {peer}: line of 11 bytes exceeds the limit of 10")


# -- --max-conns -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_max_conns_refuses_with_error_frame_then_accepts_again() -> None:
    """Bugs caught: the limit not enforced; a refused client left hanging (no error frame,
    no close); the slot not given back when a connection ends."""
    with running_server("--max-conns", "2") as srv:
        first, second = srv.connect(), srv.connect()
        with first, second:
            assert request(first, b"1") == (False, b"1")
            assert request(second, b"2") == (False, b"2")
            with srv.connect() as third:
                error = b"too many connections (limit 2)"
                assert recv_until_eof(third) == (0x80000000 | len(error)).to_bytes(4, "big") + error
            srv.wait_log(r"WARNING: refusing .*too many connections \(--max-conns 2\)")
            # A storm of refusals is logged once, not once per connection.
            for _ in range(30):
                with srv.connect() as extra:
                    assert recv_until_eof(extra)[:4] == (0x80000000 | len(error)).to_bytes(4, "big")
            assert srv.log_count("refusing") <= 2
            first.close()

            def served() -> bool:
                with srv.connect() as s:
                    s.sendall(frame(b"again"))
                    try:
                        return recv_frame(s) == (False, b"again")
                    except ConnectionError:
                        return False

            wait_for(served, timeout=10, interval=0.05, what="a freed slot to be reused")
            assert request(second, b"still") == (False, b"still")


# -- --idle-timeout -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_idle_timeout_closes_idle_keeps_busy() -> None:
    """Bugs caught: idle connections never closed, closed without an error frame, or a
    connection with traffic closed anyway (activity not counted)."""
    with (
        running_server("--idle-timeout", "0.5") as srv,
        srv.connect() as idle,
        srv.connect() as busy,
    ):
        start = time.monotonic()
        busy_for = 1.5  # three idle timeouts
        while time.monotonic() - start < busy_for:
            assert request(busy, b"tick") == (False, b"tick")
            time.sleep(0.1)  # the traffic pattern itself: a request every 0.1 s
        # The idle one has been closed meanwhile, after its error frame.
        error = b"idle timeout (0.5 s)"
        assert recv_until_eof(idle) == (0x80000000 | len(error)).to_bytes(4, "big") + error
        srv.wait_log(r"closing 127\.0\.0\.1:\d+: idle for 0\.5 s")
        # ... and the busy one, once it goes quiet.
        idle_since = time.monotonic()
        assert recv_frame(busy) == (True, error)
        assert recv_until_eof(busy) == b""
        assert 0.3 < time.monotonic() - idle_since < 3


@pytest.mark.timeout(60)
def test_idle_timeout_waits_for_work_in_progress() -> None:
    """Bug caught: a connection closed as idle while its handler is still working on a reply."""
    with running_server(
        "--handler", f"{PLUGINS}:Deferred", "--deferred-delay", "1.0",
        "--idle-timeout", "0.3", env=plugin_env(),
    ) as srv, srv.connect() as sock:
        assert request(sock, b"slow") == (False, b"slow")


# -- running out of file descriptors ------------------------------------------------

#: The server's descriptor limit for the EMFILE test (soft and hard, as the server
#: raises soft to hard at start).  Its own baseline is about ten.
FD_LIMIT = 40


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.mark.timeout(90)
def test_out_of_descriptors_logs_once_does_not_spin_and_recovers() -> None:
    """Bugs caught: a level-triggered listener with a pending connection it cannot accept
    spinning at 100% CPU; a log line per failed accept; served clients starved; accepting
    never resumed once descriptors are free."""
    with running_server(preexec_fn=_low_fd_limit) as srv:
        served: list[socket.socket] = []
        waiting: list[socket.socket] = []
        try:
            # Fill the server's table: every accepted connection answers.  Room for
            # FD_LIMIT - baseline is certain; beyond, one unanswered request ends it.
            certain = FD_LIMIT - srv.open_fds() - 2
            for i in range(FD_LIMIT):
                s = srv.connect()
                s.settimeout(10 if i < certain else 1)
                s.sendall(frame(b"%d" % i))
                try:
                    assert recv_frame(s) == (False, b"%d" % i)
                    served.append(s)
                except TimeoutError:
                    s.settimeout(10)
                    waiting.append(s)
                    break
            assert waiting, f"{FD_LIMIT} connections all served under a limit of {FD_LIMIT}"
            for i in range(5):  # more in the backlog
                s = srv.connect()
                s.sendall(frame(b"queued %d" % i))
                waiting.append(s)
            srv.wait_log(r"accept failed: Too many open files; pausing accepts")
            # No spinning: over one second the server uses little CPU.
            cpu = srv.cpu_seconds()
            time.sleep(1.0)  # measuring CPU use needs time to pass; there is no condition
            used = srv.cpu_seconds() - cpu
            assert used < 0.3, f"server used {used:.2f} s of CPU in 1 s while out of descriptors"
            assert srv.log_count("accept failed") == 1
            # Connections already open keep being served.
            for s in served[:3]:
                assert request(s, b"still here") == (False, b"still here")
            # Free some descriptors: the waiting clients are accepted and answered.
            for s in served[:10]:
                s.close()
            for i, s in enumerate(waiting):
                want = b"%d" % (len(served)) if i == 0 else b"queued %d" % (i - 1)
                assert recv_frame(s) == (False, want)
            srv.wait_log(r"accepting connections again")
            assert srv.log_count("accept failed") == 1
        finally:
            for s in served + waiting:
                s.close()
        assert srv.stop() == 0


@pytest.mark.timeout(30)
def test_shutdown_after_accepts_resumed_unregisters_the_listener() -> None:
    """Bug caught: shutdown skipping the selector unregister when EMFILE had paused accepts
    and the listener was re-registered since (a closed descriptor left in the selector: the
    next socket or pipe given that number cannot be registered)."""
    import os
    import subprocess
    import sys

    from muxsrv.loop import EventLoop
    from muxsrv.server import EMFILE_BACKOFF, Server, Settings

    loop = EventLoop()
    fillers: list[int] = []
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = Server(loop, Settings(port=0, idle_timeout=0), function=lambda p: p)
    before = {fd for fd in range(1024) if loop.is_registered(fd)}  # the loop's own waker
    host, port = server.listen()[0]
    (lfd,) = {fd for fd in range(1024) if loop.is_registered(fd)} - before
    # A client in another process (its descriptors are its own), told when to connect.
    client = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys; sys.stdin.readline(); "
         f"s = socket.create_connection(({host!r}, {port})); sys.stdin.readline()"],
        stdin=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdin is not None
        # No descriptor left for this process: the next accept fails with EMFILE.
        top = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, limits[1]))
        try:
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        client.stdin.write("connect\n")
        client.stdin.flush()
        loop.run_until(lambda: not loop.is_registered(lfd), 10)
        assert not loop.is_registered(lfd), "EMFILE did not pause accepting"
        for fd in fillers:
            os.close(fd)
        fillers.clear()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        loop.run_until(lambda: loop.is_registered(lfd), EMFILE_BACKOFF * 50)
        assert loop.is_registered(lfd), "accepts never resumed"
        server.shutdown()
        assert not loop.is_registered(lfd)
        # The number is free again and anything given it can be registered.
        a, b = socket.socketpair()
        with a, b:
            loop.add_reader(a.fileno(), lambda: None)
            assert loop.remove_reader(a.fileno())
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        if client.stdin is not None:
            client.stdin.close()
        client.wait(10)
        loop.close()

