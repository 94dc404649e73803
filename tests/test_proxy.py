"""--proxy-protocol on a real server: the header's address is conn.peer and the log's;
--proxy-from refuses whoever else connects; bad headers close without a traceback.
And --pid-file."""

from __future__ import annotations

import socket
from pathlib import Path

from muxsrv.stages.proxy import v1_header, v2_header
from tests.support import (
    ServerProcess,
    frame,
    plugin_env,
    recv_frame,
    recv_until_eof,
    running_server,
    wait_for,
)

PEERS = ("--handler", "muxsrv_testplugins.handlers:Peers")


def test_v1_and_v2_headers_name_the_client() -> None:
    with running_server(*PEERS, "--proxy-protocol", env=plugin_env()) as srv:
        cases = [
            (v1_header(("192.0.2.7", 56324), ("127.0.0.1", srv.port)), "('192.0.2.7', 56324)"),
            (v2_header(("2001:db8::7", 4433), ("2001:db8::1", srv.port)),
             "('2001:db8::7', 4433, 0, 0)"),
        ]
        for header, shown in cases:
            with srv.connect() as sock:
                # The header and the first frames in one segment: nothing after it lost.
                sock.sendall(header + frame(b"one") + frame(b"peer?") + frame(b"two"))
                assert [recv_frame(sock) for _ in range(3)] == [
                    (False, b"one"), (False, shown.encode()), (False, b"two")]
            srv.wait_log(f"peer: {shown.replace('(', '.').replace(')', '.')}")
        with srv.connect() as sock:  # a health check: the socket's own address
            sock.sendall(v2_header(None) + frame(b"peer?"))
            assert recv_frame(sock) == (False, repr(sock.getsockname()).encode())
        assert srv.stop() == 0


def test_missing_or_malformed_headers_close_with_the_socket_address() -> None:
    with running_server(*PEERS, "--proxy-protocol", env=plugin_env()) as srv:
        for data in (frame(b"peer?"), b"PROXY TCP4 1.2.3.4\r\n", b"PROXY TCP4 " + b"9" * 200):
            with srv.connect() as sock:
                sock.sendall(data)
                port = sock.getsockname()[1]
                assert recv_until_eof(sock) == b""  # no reply, no error frame: closed
            srv.wait_log(f"closing 127.0.0.1:{port}: bad PROXY protocol header")
        assert srv.stop() == 0
        log = srv.final_log()
        assert "Traceback" not in log and "peer:" not in log


def test_proxy_from_refuses_everyone_else() -> None:
    with running_server(*PEERS, "--proxy-protocol", "--proxy-from", "10.0.0.0/8,::1",
                        env=plugin_env()) as srv:
        assert "PROXY protocol from 10.0.0.0/8,::1/128" in srv.stderr_text()
        with srv.connect() as sock:
            port = sock.getsockname()[1]
            try:  # closed at accept, unread: a reset, or EOF if it came first
                sock.sendall(v1_header(("192.0.2.7", 5), ("127.0.0.1", srv.port))
                             + frame(b"peer?"))
                assert recv_until_eof(sock) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        srv.wait_log(f"refusing 127.0.0.1:{port}: not in --proxy-from")
        assert srv.stop() == 0
        assert "peer:" not in srv.final_log()


def test_without_proxy_protocol_a_header_is_just_bytes() -> None:
    with running_server(*PEERS, "--framing", "line", env=plugin_env()) as srv:
        with srv.connect() as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 5 6\r\npeer?\n")
            sock.shutdown(socket.SHUT_WR)
            reply = recv_until_eof(sock)
        assert reply.startswith(b"PROXY TCP4 192.0.2.7 127.0.0.1 5 6\n('127.0.0.1', ")


def test_pid_file_is_written_once_listening_and_removed_on_exit(tmp_path: Path) -> None:
    pid_file = tmp_path / "muxsrv.pid"
    for workers in ("1", "2"):
        with running_server("--pid-file", str(pid_file), "--workers", workers) as srv:
            wait_for(pid_file.exists, what="the PID file")
            assert pid_file.read_text() == f"{srv.pid}\n"  # with --workers: the parent's
            assert srv.stop() == 0
        assert not pid_file.exists()
    srv = ServerProcess(["--port", "0", "--pid-file", str(tmp_path / "no" / "dir")])
    assert srv.wait() == 1
    assert "--pid-file" in srv.final_log() and "Traceback" not in srv.final_log()
