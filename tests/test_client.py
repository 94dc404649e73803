"""The client library and ``python -m muxsrv.client`` against a real server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from support import PLUGINS, ROOT, plugin_env, running_server, wait_for

from muxsrv.client import Client, ConnectionClosed, ServerError

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20
HANDLER_ERROR = "handler error (ValueError); details are in the server log"


def test_request_and_pipeline() -> None:
    """Bug caught: replies mismatched to requests, or a pipeline that loses one."""
    with running_server("--handler", "upper") as srv, Client(srv.host, srv.port) as c:
        assert c.request(b"hello") == b"HELLO"
        assert c.request(b"") == b""
        payloads = [b"m%d" % i for i in range(500)]
        assert c.pipeline(payloads) == [p.upper() for p in payloads]
        assert c.pipeline([]) == []


def test_pipeline_larger_than_the_socket_buffers_does_not_deadlock() -> None:
    """Bug caught: the client sending everything before reading, while the server stops
    reading until its replies are read (both sides blocked forever)."""
    payloads = [bytes([i % 256]) * 100_000 for i in range(300)]  # 30 MB each way
    with running_server() as srv, Client(srv.host, srv.port, timeout=30) as c:
        assert c.pipeline(payloads) == payloads


def test_error_frame_raises_server_error_with_the_message() -> None:
    """Bug caught: an error frame returned as a reply, or its text lost."""
    with (
        running_server("--handler", f"{PLUGINS}:boom", env=plugin_env()) as srv,
        Client(srv.host, srv.port) as c,
    ):
        with pytest.raises(ServerError) as info:
            c.request(b"boom")
        assert info.value.message == HANDLER_ERROR
        assert c.request(b"fine") == b"fine"
        # In a pipeline, the error is raised once every reply has been read, so the
        # connection stays in step.
        with pytest.raises(ServerError, match=r"handler error \(ValueError\)"):
            c.pipeline([b"a", b"boom", b"c"])
        assert c.request(b"next") == b"next"


def test_pipeline_cut_short_by_the_server_raises_its_reason() -> None:
    """Bug caught: the server's error frame explaining why it closed (here: a message over
    --max-frame) hidden behind a bare ConnectionClosed."""
    with (
        running_server("--max-frame", "1000") as srv,
        Client(srv.host, srv.port) as c,
        pytest.raises(ServerError, match="frame of 2000 bytes exceeds the limit of 1000"),
    ):
        c.pipeline([b"a", b"x" * 2000, b"b"])


def test_closed_connection_raises_connection_closed() -> None:
    with running_server("--idle-timeout", "0.2") as srv, Client(srv.host, srv.port) as c:
        with pytest.raises(ServerError, match=r"idle timeout \(0.2 s\)"):
            c.recv()
        with pytest.raises(ConnectionClosed):
            c.recv()


def test_closed_by_server_between_requests_and_reconnect() -> None:
    """Bug caught: a connection the server closed while idle taken for an open one (its
    error frame then read as the next request's reply), or not replaced by reconnect."""
    args = ("--handler", "upper", "--idle-timeout", "0.3")
    with running_server(*args) as srv, Client(srv.host, srv.port) as c:
        assert c.closed_by_server() is None
        assert c.request(b"a") == b"A"
        why = wait_for(c.closed_by_server, what="the idle timeout seen by the client")
        assert why == "idle timeout (0.3 s)"
        c.reconnect()
        assert c.closed_by_server() is None
        assert c.request(b"b") == b"B" and c.reconnects == 1
    args = ("--handler", "upper", "--framing", "line", "--idle-timeout", "0.3")
    with running_server(*args) as srv, Client(srv.host, srv.port, framing="line") as c:
        assert c.request(b"a") == b"A"
        # No error channel: closed without a word.
        assert wait_for(lambda: c.closed_by_server() is not None) and c.closed_by_server() == ""


def test_timeouts() -> None:
    """Bug caught: a client blocking forever on a server that does not answer."""
    with running_server("--handler", f"{PLUGINS}:quiet", env=plugin_env()) as srv:
        with Client(srv.host, srv.port, timeout=0.3) as c:
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                c.request(b"quiet please")
            assert time.monotonic() - start < 3
        with Client(srv.host, srv.port, timeout=0.3) as c:
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                c.pipeline([b"quiet", b"loud"])
            assert time.monotonic() - start < 3


def test_context_manager_closes_the_connection() -> None:
    """Bug caught: the socket left open after the with block."""
    with running_server("--handler", f"{PLUGINS}:Tracer", env=plugin_env()) as srv:
        with Client(srv.host, srv.port) as c:
            assert c.request(b"x") == b"x"
        with pytest.raises(OSError):
            c.send(b"after close")
        srv.wait_log(r"tracer #1 made message:x eof lost")


def test_line_and_raw_framing() -> None:
    with (
        running_server("--handler", "upper", "--framing", "line") as srv,
        Client(srv.host, srv.port, framing="line") as c,
    ):
        assert c.request(b"abc") == b"ABC"
        assert c.pipeline([b"x", b"", b"y"]) == [b"X", b"", b"Y"]
        with pytest.raises(ValueError, match="cannot contain a newline"):
            c.request(b"two\nlines")
    with (
        running_server("--handler", "upper", "--framing", "raw") as srv,
        Client(srv.host, srv.port, framing="raw") as c,
    ):
        assert c.request(b"abc") == b"ABC"
        with pytest.raises(ValueError, match="raw has no boundaries"):
            c.pipeline([b"a"])
    with pytest.raises(ValueError, match="unknown framing"):
        Client("127.0.0.1", 1, framing="json")


# -- the command line ------------------------------------------------------------------


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "muxsrv.client", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def test_client_cli_prints_each_reply_on_its_own_line() -> None:
    with running_server("--handler", "upper") as srv:
        run = run_client("--port", str(srv.port), "hello", "wörld")
    assert (run.returncode, run.stdout, run.stderr) == (0, "HELLO\nWÖRLD\n", "")


def test_client_cli_server_error_is_reported_and_fails() -> None:
    with running_server("--handler", f"{PLUGINS}:boom", env=plugin_env()) as srv:
        run = run_client("--port", str(srv.port), "a", "boom", "b")
    assert run.returncode == 1
    assert run.stdout == "a\nb\n"
    assert run.stderr == f"muxsrv-client: server error: {HANDLER_ERROR}\n"


def test_client_cli_connection_refused_is_one_line() -> None:
    """Bug caught: a traceback (or exit 0) when nothing listens."""
    with socket.socket() as reserved:  # bound, not listening: connecting is refused
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        run = run_client("--port", str(port), "hello")
    assert run.returncode != 0
    assert run.stdout == ""
    assert run.stderr == (
        f"muxsrv-client: error: cannot reach 127.0.0.1:{port}: Connection refused\n"
    )


def test_client_cli_timeout_is_one_line() -> None:
    with running_server("--handler", f"{PLUGINS}:quiet", env=plugin_env()) as srv:
        run = run_client("--port", str(srv.port), "--timeout", "0.3", "quiet")
    assert run.returncode == 1
    assert run.stderr == f"muxsrv-client: error: 127.0.0.1:{srv.port}: timed out after 0.3 s\n"


def test_client_cli_piped_input_sends_each_line() -> None:
    """Bug caught: the line loop dropping lines, sending blank ones, or not ending at EOF."""
    with running_server("--handler", "upper") as srv:
        result = subprocess.run(
            [sys.executable, "-m", "muxsrv.client", "--port", str(srv.port)],
            input="hello\n\nwörld\n", capture_output=True, text=True, timeout=30, cwd=ROOT,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "HELLO\nWÖRLD\n"  # no prompts when piped


# -- a handler failing before any reply ------------------------------------------------


def test_connection_made_failure_reaches_the_client_as_an_error_frame() -> None:
    """Bug caught: a handler whose connection_made raises seen by the client as "connection
    reset by peer" (or a bare close) instead of the server's error frame."""
    text = "handler error (RuntimeError); details are in the server log"
    with running_server("--handler", f"{PLUGINS}:FailsOnConnect", env=plugin_env()) as srv:
        for _ in range(3):
            with Client(srv.host, srv.port) as c, pytest.raises(ServerError) as info:
                c.request(b"hi")
            assert info.value.message == text
        run = run_client("--port", str(srv.port), "hi")
    assert (run.returncode, run.stdout) == (1, "")
    assert text in run.stderr and "reset" not in run.stderr
