"""The server's life and its connections' ends: disconnects, resets, failing handlers,
the SIGTERM drain, and every descriptor given back."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time

import pytest
from support import (
    PLUGINS,
    frame,
    plugin_env,
    recv_exact,
    recv_frame,
    recv_until_eof,
    running_server,
    wait_for,
)

MiB = 1 << 20
HANDLER_ERROR = "handler error (ValueError); details are in the server log"


SHUTTING_DOWN = b"server shutting down"


def frame_error(text: bytes) -> bytes:
    return struct.pack(">I", 0x80000000 | len(text)) + text


def request(sock: socket.socket, payload: bytes) -> tuple[bool, bytes]:
    sock.sendall(frame(payload))
    return recv_frame(sock)


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def local_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# -- the peer goes away ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("claimed", [1000, 10000], ids=["small", "body-buffer"])
def test_disconnect_mid_frame(claimed: int) -> None:
    """Bug caught: half a frame handed to the handler at EOF, or the server disturbed."""
    with running_server("--handler", f"{PLUGINS}:recorder", env=plugin_env()) as srv:
        with srv.connect() as other:
            with srv.connect() as sock:
                port = local_port(sock)
                sock.sendall(claimed.to_bytes(4, "big") + b"PARTIAL" + b"p" * 93)
            srv.wait_log(rf"127\.0\.0\.1:{port} closed mid-message; 104 bytes dropped")
            assert request(other, b"fine") == (False, b"fine")
        assert "PARTIAL" not in srv.stderr_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["mid-frame", "with-reply-pending"])
def test_reset_by_peer(when: str) -> None:
    """Bug caught: ECONNRESET on recv/send escaping the one error path (traceback, crash)."""
    with running_server("--handler", f"{PLUGINS}:recorder", env=plugin_env()) as srv:
        with srv.connect() as other:
            sock = srv.connect()
            port = local_port(sock)
            if when == "mid-frame":
                sock.sendall(b"\0\0\0\x64PARTIAL")
            else:  # a large reply on its way out when the peer vanishes
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(frame(b"z" * 8 * MiB))
                srv.wait_log("handler got 8388608 bytes")
            reset(sock)
            # After a reset the socket no longer knows its peer; the server looks the
            # address up lazily (to save memory), so it may only say "unknown peer".
            srv.wait_log(
                rf"INFO: (127\.0\.0\.1:{port}|unknown peer): (recv|send) failed: Connection reset"
            )
            assert request(other, b"fine") == (False, b"fine")
        assert "PARTIAL" not in srv.stderr_text()
        assert "Traceback" not in srv.stderr_text()


# -- handlers that fail, or say nothing ------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("handler", ["boom", "RaisingClass"])
def test_raising_handler_gets_error_frame_and_connection_goes_on(handler: str) -> None:
    """Bugs caught: a handler exception killing the connection (or the server); no
    traceback in the log; the message answered with nothing (a client waiting forever)."""
    with running_server("--handler", f"{PLUGINS}:{handler}", env=plugin_env()) as srv:
        with srv.connect() as sock:
            sock.sendall(frame(b"a") + frame(b"boom!") + frame(b"b"))
            assert recv_frame(sock) == (False, b"a")
            assert recv_frame(sock) == (True, HANDLER_ERROR.encode())
            assert recv_frame(sock) == (False, b"b")
            assert request(sock, b"c") == (False, b"c")
        srv.wait_log(r"ERROR: handler failed on a message from 127\.0\.0\.1:\d+")
        srv.wait_log(r"ValueError: kaboom on b'boom!'")
        assert "Traceback (most recent call last)" in srv.stderr_text()


@pytest.mark.timeout(60)
def test_raising_handler_with_line_framing_closes_the_connection() -> None:
    """Bug caught: with no error channel, a failed message silently skipped (the client's
    replies shift by one) instead of the connection closing; earlier replies lost."""
    with running_server(
        "--handler", f"{PLUGINS}:boom", "--framing", "line", env=plugin_env()
    ) as srv, srv.connect() as sock:
        sock.sendall(b"a\nboom\nb\n")
        assert recv_until_eof(sock) == b"a\n"
        srv.wait_log(r"ValueError: kaboom on b'boom'")


@pytest.mark.timeout(60)
def test_handler_returning_wrong_type_is_a_handler_error() -> None:
    """Bug caught: a str reply crashing the send path (or sent as something else)."""
    with running_server("--handler", f"{PLUGINS}:wrong_type", env=plugin_env()) as srv:
        with srv.connect() as sock:
            error = "handler error (TypeError); details are in the server log"
            assert request(sock, b"x") == (True, error.encode())
            assert request(sock, b"y") == (True, error.encode())
        srv.wait_log("handler returned str; expected bytes or None")


@pytest.mark.timeout(60)
def test_handler_returning_none_sends_no_reply() -> None:
    """Bug caught: None sent as an empty frame (every later reply off by one)."""
    with (
        running_server("--handler", f"{PLUGINS}:quiet", env=plugin_env()) as srv,
        srv.connect() as sock,
    ):
        sock.sendall(b"".join(frame(m) for m in [b"quiet1", b"hello", b"quiet2", b"", b"end"]))
        assert [recv_frame(sock) for _ in range(3)] == [
            (False, b"hello"), (False, b""), (False, b"end")
        ]


CONNECT_FAILED = b"handler error (RuntimeError); details are in the server log"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("handler", "logged"),
    [
        ("FailsOnConnect", r"ERROR: 127\.0\.0\.1:\d+: handler connection_made failed"),
        ("FailsOnLost", r"ERROR: .*: handler connection_lost failed"),
        ("FactoryFails", r"ERROR: handler factory failed; connection closed"),
    ],
)
def test_handler_lifecycle_errors_end_one_connection_not_the_server(
    handler: str, logged: str
) -> None:
    """Bug caught: an exception from connection_made, connection_lost or the factory
    escaping into the loop (a leaked socket, a dead server, no log); connection_made's
    reaching the client as a reset instead of an error frame."""
    with running_server("--handler", f"{PLUGINS}:{handler}", env=plugin_env()) as srv:
        baseline = srv.open_fds()
        for _ in range(3):
            with srv.connect() as sock:
                if handler == "FailsOnLost":
                    assert request(sock, b"hi") == (False, b"hi")
                elif handler == "FailsOnConnect":  # told why, then a graceful close
                    sock.sendall(frame(b"hi"))
                    assert recv_frame(sock) == (True, CONNECT_FAILED)
                    assert sock.recv(100) == b""
                else:
                    sock.sendall(frame(b"hi"))
                    # Closed, perhaps with our request unread (a reset): no reply either way.
                    with contextlib.suppress(ConnectionResetError):
                        assert sock.recv(100) == b""
        srv.wait_log(logged)
        srv.wait_log("RuntimeError: ")
        wait_for(lambda: srv.open_fds() == baseline, timeout=10, what="descriptors back")
        assert srv.proc.poll() is None
        assert srv.stop() == 0


# -- pause_reading ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pause_reading_holds_messages_already_received() -> None:
    """Bug caught: after pause_reading, the rest of the messages decoded from the same recv
    still handed to the handler (a handler bounding its queue by pausing gets them all)."""
    with (
        running_server("--handler", f"{PLUGINS}:Pauser", env=plugin_env()) as srv,
        srv.connect() as sock,
    ):
        sock.sendall(b"".join(frame(m) for m in [b"pause", b"x", b"y", b"pause", b"z"]))
        replies = [recv_frame(sock) for _ in range(5)]
        assert replies == [
            (False, b"paused"), (False, b"x"), (False, b"y"), (False, b"paused"), (False, b"z")
        ]
        assert request(sock, b"after") == (False, b"after")
        assert "message while paused" not in srv.stderr_text()


@pytest.mark.timeout(60)
def test_the_drain_respects_a_pause_and_says_goodbye_at_its_end() -> None:
    """Bugs caught: the drain handing messages to a handler that paused reading (it is still
    running: a pause is its to lift); a paused connection dropped without the goodbye frame
    (its client could not know that resending x and y is safe: the handler never saw them)."""
    with running_server(
        "--handler", f"{PLUGINS}:Pauser", "--drain-timeout", "1", env=plugin_env()
    ) as srv:
        with srv.connect() as sock:
            sock.sendall(b"".join(frame(m) for m in [b"pause-long", b"x", b"y"]))
            assert recv_frame(sock) == (False, b"paused")
            srv.signal(signal.SIGTERM)
            assert recv_frame(sock) == (True, SHUTTING_DOWN)
            assert recv_until_eof(sock) == b""
        assert srv.wait() == 0
        assert "message while paused" not in srv.final_log()


# -- SIGTERM: the drain ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_delivers_owed_output_then_exits_0() -> None:
    """Bug caught: shutdown dropping replies already owed (queued for a slow reader).

    The client pipelines without reading until the server stops reading; at
    SIGTERM the server owes megabytes.  Every message the handler was given
    must be answered, byte-exact and in order, then a clean EOF.
    """
    payloads = [b"%08d" % i + b"." * (64 * 1024 - 8) for i in range(400)]
    with running_server("--handler", f"{PLUGINS}:recorder", env=plugin_env()) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.connect(srv.address)
        sock.settimeout(30)
        sent = [0]

        def write() -> None:
            try:
                for p in payloads:
                    sock.sendall(frame(p))
                    sent[0] += 1
            except OSError:
                pass  # the server closes while we are still sending: expected

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        progress = {"n": -1, "at": time.monotonic()}

        def stalled() -> bool:
            n = srv.log_count("handler got")
            if n != progress["n"]:
                progress["n"], progress["at"] = n, time.monotonic()
                return False
            return n > 0 and time.monotonic() - progress["at"] > 0.5

        wait_for(stalled, timeout=30, what="the server to stop reading")
        assert sent[0] < len(payloads)
        srv.signal(signal.SIGTERM)
        replies = []
        with sock:
            while True:
                header = sock.recv(4, socket.MSG_WAITALL)
                assert len(header) == 4, "the reply stream ended without the goodbye frame"
                if header[0] & 0x80:  # the error frame that ends the drain
                    text = recv_exact(sock, int.from_bytes(header, "big") & 0x7FFFFFFF)
                    assert text == SHUTTING_DOWN
                    break
                assert int.from_bytes(header, "big") == 64 * 1024
                replies.append(recv_exact(sock, 64 * 1024))
            assert recv_until_eof(sock) == b""
        assert srv.wait() == 0
        handled = srv.final_log().count("handler got")
        assert replies == payloads[: len(replies)]
        assert len(replies) == handled > 0


@pytest.mark.timeout(60)
def test_sigterm_waits_for_work_in_progress_and_refuses_new_connections() -> None:
    """Bugs caught: the drain not waiting for a handler's pending reply; the listener left
    open during the drain; a non-zero exit after a clean shutdown."""
    with running_server(
        "--handler", f"{PLUGINS}:Deferred", "--deferred-delay", "0.5", env=plugin_env()
    ) as srv:
        with srv.connect() as busy, srv.connect() as idle:
            busy.sendall(frame(b"owed"))
            srv.wait_log("deferred got b'owed'")
            srv.signal(signal.SIGTERM)
            srv.wait_log("shutting down: draining 2 connections")
            with pytest.raises(ConnectionRefusedError):
                srv.connect()
            # Owed nothing: told at once (after a moment of quiet) and closed.
            assert recv_until_eof(idle) == frame_error(SHUTTING_DOWN)
            assert recv_frame(busy) == (False, b"owed")
            assert recv_until_eof(busy) == frame_error(SHUTTING_DOWN)
        assert srv.wait() == 0


@pytest.mark.timeout(60)
def test_the_drain_keeps_answering_until_the_client_is_quiet() -> None:
    """Bug caught: a drain that stops reading at once (requests in flight at SIGTERM are never
    answered and the client cannot know which), or closes mid-conversation without the frame.

    A client keeps making requests one after another across SIGTERM: every one it sent
    is answered until, the moment it pauses, the goodbye frame arrives."""
    with running_server() as srv, srv.connect() as sock:
        assert request(sock, b"first") == (False, b"first")
        srv.signal(signal.SIGTERM)
        srv.wait_log("shutting down: draining 1 connections")
        for i in range(20):  # still read and answered during the drain
            assert request(sock, b"%d" % i) == (False, b"%d" % i)
        assert recv_frame(sock) == (True, SHUTTING_DOWN)  # quiet now: goodbye
        assert recv_until_eof(sock) == b""
        assert srv.wait() == 0


@pytest.mark.timeout(60)
def test_a_second_signal_stops_the_drain_at_once_with_status_1() -> None:
    """Bug caught: a second SIGTERM ignored while a drain waits for work in progress."""
    with running_server(
        "--handler", f"{PLUGINS}:Deferred", "--deferred-delay", "30",
        "--drain-timeout", "30", env=plugin_env(),
    ) as srv, srv.connect() as busy:
        busy.sendall(frame(b"owed"))
        srv.wait_log("deferred got b'owed'")
        srv.signal(signal.SIGTERM)
        srv.wait_log("shutting down: draining 1 connections")
        start = time.monotonic()
        srv.signal(signal.SIGTERM)
        assert srv.wait(10) == 1
        assert time.monotonic() - start < 5


@pytest.mark.timeout(60)
def test_drain_timeout_ends_a_drain_that_cannot_finish() -> None:
    """Bug caught: a client that never reads keeping the server alive forever after SIGTERM."""
    with running_server("--drain-timeout", "0.5") as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(srv.address)
        with sock:
            sock.sendall(frame(b"q" * 12 * MiB))
            sock.settimeout(10)
            assert sock.recv(4, socket.MSG_WAITALL) == (12 * MiB).to_bytes(4, "big")
            # The reply has started and cannot all leave: the drain cannot finish.
            srv.signal(signal.SIGTERM)
            start = time.monotonic()
            assert srv.wait(15) == 0
            assert time.monotonic() - start < 5
        srv.wait_log("drain timeout: closing 1 connections still busy")


# -- descriptors ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_descriptors_return_to_baseline() -> None:
    """Bug caught: a descriptor leaked on any way a connection can end (reset, EOF mid-frame,
    violation with a lingering close, idle timeout, refusal, send failure, ...)."""
    with running_server(
        "--max-conns", "20", "--idle-timeout", "1", "--max-frame", "100000"
    ) as srv:
        baseline = srv.open_fds()
        held: list[socket.socket] = []
        try:
            for _ in range(5):
                # A clean round trip and close; EOF after a half-close.
                with srv.connect() as s:
                    assert request(s, b"ok") == (False, b"ok")
                with srv.connect() as s:
                    s.sendall(frame(b"bye"))
                    s.shutdown(socket.SHUT_WR)
                    assert recv_until_eof(s) == frame(b"bye")
                # Closed or reset at once; closed or reset mid-frame.
                srv.connect().close()
                reset(srv.connect())
                s = srv.connect()
                s.sendall(b"\0\0\0\x64abc")
                s.close()
                s = srv.connect()
                s.sendall(b"\0\1\0\0" + b"d" * 5000)
                reset(s)
                # A violation: the client reads the error and closes ...
                with srv.connect() as s:
                    s.sendall(b"\xff\xff\xff\xff")
                    assert recv_until_eof(s)[:4] != b""
                # ... or holds its end open (the server's lingering close must time out).
                s = srv.connect()
                s.sendall(b"\xff\xff\xff\xff")
                held.append(s)
                # A reply the client never reads, then a reset (send fails).
                s = srv.connect()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(frame(b"r" * 90000) * 20)
                reset(s)
            # Idle connections held open: the idle timeout closes them ...
            for _ in range(10):
                s = srv.connect()
                assert request(s, b"then idle") == (False, b"then idle")
                held.append(s)
            # ... and these, over --max-conns, are refused.
            for _ in range(15):
                held.append(srv.connect())
            srv.wait_log("refusing")
            wait_for(lambda: srv.open_fds() == baseline, timeout=20, interval=0.05,
                     what=f"the server's descriptors back to {baseline} (now {srv.open_fds()})")
        finally:
            for s in held:
                s.close()
        with srv.connect() as s:
            assert request(s, b"still serving") == (False, b"still serving")
        wait_for(lambda: srv.open_fds() == baseline, timeout=10, interval=0.05)
        assert "Traceback" not in srv.stderr_text()
        assert srv.stop() == 0
