"""TLS on a real server: Python's ssl and openssl s_client as clients, every framing.

Certificates come from the session fixture ``certs`` (tls_certs.py).  Every
wait has a deadline; servers are stopped by the PID we started.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from support import (
    PLUGINS,
    ROOT,
    ServerProcess,
    frame,
    plugin_env,
    recv_exact,
    recv_frame,
    recv_until_eof,
    running_server,
)
from tls_certs import Certs

from muxsrv.client import Client
from muxsrv.handlers.exec_protocol import decode_reply


def tls_args(certs: Certs, *more: str) -> list[str]:
    return ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), *more]


@contextmanager
def tls_server(certs: Certs, *more: str, env: dict[str, str] | None = None,
               ) -> Iterator[ServerProcess]:
    with running_server(*tls_args(certs, *more), env=env) as srv:
        yield srv


def tls_connect(srv: ServerProcess, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(srv.address, timeout=10)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_pipelined_length_framing_both_versions(certs: Certs, version: ssl.TLSVersion) -> None:
    messages = [bytes([i % 251]) * (i * 37 % 5000) for i in range(300)] + [b"y" * 1_000_000]
    with tls_server(certs) as srv, tls_connect(srv, certs.client_context(version)) as sock:
        assert sock.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
        sock.sendall(b"".join(frame(m) for m in messages))
        for message in messages:
            assert recv_frame(sock) == (False, message)


def test_pipelined_line_framing_byte_exact(certs: Certs) -> None:
    lines = [b"line %d " % i + b"x" * i for i in range(500)]
    data = b"".join(line + b"\n" for line in lines)
    with tls_server(certs, "--framing", "line") as srv, \
            tls_connect(srv, certs.client_context()) as sock:
        sock.sendall(data)
        assert recv_exact(sock, len(data)) == data


def test_close_notify_half_close_then_ours(certs: Certs) -> None:
    """TLS 1.3: the client's close_notify is a half-close; replies owed still come."""
    context = certs.client_context(ssl.TLSVersion.TLSv1_3)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with tls_server(certs) as srv, socket.create_connection(srv.address, timeout=10) as sock:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        obj.write(frame(b"a" * 200_000) + frame(b"b"))
        with pytest.raises(ssl.SSLWantReadError):
            obj.unwrap()  # close_notify right behind the requests
        sock.sendall(outgoing.read())
        plaintext = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            incoming.write(data)
            try:
                while chunk := obj.read(65536):
                    plaintext += chunk
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLZeroReturnError:
                break
        assert plaintext == frame(b"a" * 200_000) + frame(b"b")
        obj.unwrap()  # the server's close_notify arrived (else SSLWantReadError)
        srv.wait_log("close_notify received \\(a clean close\\)")


def test_truncated_close_logged_apart(certs: Certs) -> None:
    with tls_server(certs) as srv:
        sock = tls_connect(srv, certs.client_context())
        sock.sendall(frame(b"hi"))
        assert recv_frame(sock) == (False, b"hi")
        sock.shutdown(socket.SHUT_WR)  # TCP only: no close_notify
        sock.close()
        srv.wait_log("truncated: EOF without close_notify")
        assert "Traceback" not in srv.stderr_text()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_s_client(certs: Certs) -> None:
    with tls_server(certs, "--framing", "line") as srv:
        proc = subprocess.Popen(
            ["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{srv.port}",
             "-CAfile", str(certs.ca), "-verify_return_error", "-verify_hostname", "localhost"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        deadline = threading.Timer(20, proc.kill)  # bounded, whatever happens
        deadline.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"hello over tls\nsecond\n")
            proc.stdin.flush()  # (kept open: -quiet ignores EOF on stdin anyway)
            assert proc.stdout.readline() == b"hello over tls\n"
            assert proc.stdout.readline() == b"second\n"
        finally:
            deadline.cancel()
            proc.kill()
            proc.wait(10)


def test_staller_and_bytewise_hello_stall_no_one(certs: Certs) -> None:
    with tls_server(certs, "--tls-handshake-timeout", "3") as srv:
        staller = socket.create_connection(srv.address, timeout=10)
        hello = ssl.MemoryBIO(), ssl.MemoryBIO()
        slow = certs.client_context().wrap_bio(*hello, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            slow.do_handshake()
        client_hello = hello[1].read()
        trickler = socket.create_connection(srv.address, timeout=10)
        trickler.sendall(client_hello[:10])  # and then nothing for a while
        started = time.monotonic()
        with tls_connect(srv, certs.client_context()) as sock:
            for i in range(20):
                sock.sendall(frame(b"%d" % i))
                assert recv_frame(sock) == (False, b"%d" % i)
        assert time.monotonic() - started < 2.0
        for i in range(10, len(client_hello)):
            trickler.send(client_hello[i:i + 1])
        trickler.settimeout(10)
        assert trickler.recv(5)[:1] == b"\x16"  # the ServerHello came, after all
        staller.close()
        trickler.close()


def test_handshake_timeout(certs: Certs) -> None:
    with tls_server(certs, "--tls-handshake-timeout", "0.5") as srv, \
            socket.create_connection(srv.address, timeout=10) as sock:
        started = time.monotonic()
        with suppress(ConnectionResetError):
            assert sock.recv(100) == b""
        assert 0.4 < time.monotonic() - started < 5
        srv.wait_log("TLS handshake not done within 0.5 s")


def test_max_handshakes_makes_the_rest_wait(certs: Certs) -> None:
    with tls_server(certs, "--tls-max-handshakes", "1") as srv:
        staller = socket.create_connection(srv.address, timeout=10)
        staller.sendall(b"\x16\x03\x01")  # holds the one slot
        srv.wait_log("1 TLS handshakes in flight")  # accepting stopped: the next one waits
        waiting = socket.create_connection(srv.address, timeout=10)
        context = certs.client_context()
        waiting.settimeout(0.5)
        with pytest.raises((TimeoutError, ssl.SSLError, OSError)):
            context.wrap_socket(waiting, server_hostname="127.0.0.1")
        staller.close()  # frees the slot
        with tls_connect(srv, context) as sock:
            sock.sendall(frame(b"in"))
            assert recv_frame(sock) == (False, b"in")


def test_plaintext_on_the_tls_port(certs: Certs) -> None:
    with tls_server(certs) as srv, socket.create_connection(srv.address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert recv_until_eof(sock) == b""
        srv.wait_log("not TLS")
        assert srv.log_count("not TLS") == 1
        assert "Traceback" not in srv.stderr_text()


def test_client_hello_on_a_plaintext_port(certs: Certs) -> None:
    with running_server() as srv, socket.create_connection(srv.address, timeout=10) as sock:
        context = certs.client_context()
        started = time.monotonic()
        with pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(sock, server_hostname="127.0.0.1")
        assert time.monotonic() - started < 2
        srv.wait_log("looks like TLS")


def mtls_server(certs: Certs) -> ServerProcess:
    return ServerProcess(["--port", "0", *tls_args(certs, "--tls-client-ca", str(certs.ca)),
                          "--handler", f"{PLUGINS}:PeerCert"], env=plugin_env()).wait_started()


def test_mutual_tls_accepted_and_peer_cert_seen(certs: Certs) -> None:
    srv = mtls_server(certs)
    try:
        with tls_connect(srv, certs.client_context(with_cert=True)) as sock:
            sock.sendall(frame(b"who"))
            assert recv_frame(sock) == (False, b"client")
    finally:
        srv.stop()


@pytest.mark.parametrize("who", ["none", "stranger"])
def test_mutual_tls_refused(certs: Certs, who: str) -> None:
    srv = mtls_server(certs)
    try:
        context = certs.client_context(ssl.TLSVersion.TLSv1_2)
        if who == "stranger":
            context.load_cert_chain(str(certs.stranger_cert), str(certs.stranger_key))
        with pytest.raises((ssl.SSLError, OSError)), tls_connect(srv, context) as sock:
            sock.sendall(frame(b"who"))
            recv_frame(sock)
        srv.wait_log("TLS handshake failed")
        assert "Traceback" not in srv.stderr_text()
    finally:
        srv.stop()


def test_exec_over_tls(certs: Certs, tmp_path: Path) -> None:
    with tls_server(certs, "--handler", "exec", "--exec-cwd", str(tmp_path)) as srv, \
            tls_connect(srv, certs.client_context()) as sock:
        sock.sendall(frame(b"printf 'tls works'") + frame(b"echo two"))
        assert decode_reply(recv_frame(sock)[1]).stdout == b"tls works"
        assert decode_reply(recv_frame(sock)[1]).stdout == b"two\n"


def test_client_library_and_cli(certs: Certs) -> None:
    with tls_server(certs) as srv:
        with Client(*srv.address, tls=certs.client_context()) as client:
            assert client.request(b"lib") == b"lib"
        with pytest.raises(ssl.SSLCertVerificationError):
            Client(*srv.address, tls=True)  # the throwaway CA is not the system's
        cli = [sys.executable, "-m", "muxsrv.client_cli", "--port", str(srv.port), "--tls"]
        ok = subprocess.run([*cli, "--tls-ca", str(certs.ca), "via cli"], cwd=ROOT,
                            capture_output=True, timeout=20)
        assert ok.stdout == b"via cli\n", ok.stderr
        bad = subprocess.run([*cli, "nope"], cwd=ROOT, capture_output=True, timeout=20)
        assert bad.returncode != 0 and b"TLS failed" in bad.stderr


def test_bad_certificate_files_exit_2(certs: Certs, tmp_path: Path) -> None:
    for args in (["--tls-cert", str(tmp_path / "missing.pem")],
                 ["--tls-cert", str(certs.ca)],
                 ["--tls-key", str(certs.server_key)]):
        srv = ServerProcess(["--port", "0", *args])
        assert srv.wait(15) == 2
        lines = [line for line in srv.final_log().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("muxsrv: error:"), lines
        assert "PRIVATE KEY" not in lines[0]


def test_refusal_comes_inside_tls(certs: Certs) -> None:
    with tls_server(certs, "--max-conns", "1") as srv, \
            tls_connect(srv, certs.client_context()) as first:
        first.sendall(frame(b"held"))
        assert recv_frame(first) == (False, b"held")
        with tls_connect(srv, certs.client_context()) as second:
            assert recv_frame(second) == (True, b"too many connections (limit 1)")


def test_client_certificates_count_as_authentication(certs: Certs, tmp_path: Path) -> None:
    """With --tls-client-ca: no protected mode, and --allow-remote-exec is allowed."""
    srv = ServerProcess(["--port", "0", "--host", "0.0.0.0", "--handler", "exec",
                         "--allow-remote-exec", "--exec-cwd", str(tmp_path),
                         *tls_args(certs, "--tls-client-ca", str(certs.ca))]).wait_started()
    try:
        assert "protected mode" not in srv.stderr_text()
        assert "TLS with client certificates" in srv.stderr_text()
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        context = certs.client_context(with_cert=True)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(frame(b"echo remote"))
            assert decode_reply(recv_frame(sock)[1]).stdout == b"remote\n"
    finally:
        srv.stop()
    refused = ServerProcess(["--port", "0", "--host", "0.0.0.0", "--handler", "exec",
                             "--allow-remote-exec", *tls_args(certs)])
    assert refused.wait(15) == 2
    assert "--tls-client-ca" in refused.final_log()


def test_slow_tls_reader_keeps_server_memory_bounded(certs: Certs) -> None:
    """A client that sends and never reads: the server stops reading, memory stays flat."""
    with tls_server(certs) as srv, tls_connect(srv, certs.client_context()) as sock:
        sock.sendall(frame(b"warm"))
        assert recv_frame(sock) == (False, b"warm")
        base = srv.rss_bytes()
        chunk = frame(b"m" * 65536) * 16  # 1 MiB of requests, as many replies owed
        sock.settimeout(1.0)
        sent = 0
        with suppress(TimeoutError):
            while sent < 200 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        assert sent < 200 << 20, "the server never stopped reading"
        growth = srv.rss_bytes() - base
        assert growth < 40 << 20, f"server grew {growth >> 20} MiB after {sent >> 20} MiB sent"


def common_name(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert()
    assert cert is not None
    return next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")


def test_sighup_reloads_the_certificate(certs: Certs, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(certs.server_cert.read_bytes())
    key.write_bytes(certs.server_key.read_bytes())
    with running_server("--tls-cert", str(cert), "--tls-key", str(key)) as srv, \
            tls_connect(srv, certs.client_context()) as old:
        assert common_name(old) == "server"
        cert.write_text("not a certificate\n")
        srv.signal(signal.SIGHUP)
        srv.wait_log("keeping the certificate loaded before")
        with tls_connect(srv, certs.client_context()) as sock:
            assert common_name(sock) == "server"
        cert.write_bytes(certs.server2_cert.read_bytes())
        key.write_bytes(certs.server2_key.read_bytes())
        srv.signal(signal.SIGHUP)
        srv.wait_log("re-read --tls-cert")
        with tls_connect(srv, certs.client_context()) as sock:
            assert common_name(sock) == "server2"
        old.sendall(frame(b"still here"))  # open connections were not dropped
        assert recv_frame(old) == (False, b"still here")


def test_drain_says_goodbye_inside_tls(certs: Certs) -> None:
    with tls_server(certs) as srv, tls_connect(srv, certs.client_context()) as sock:
        sock.sendall(frame(b"before"))
        assert recv_frame(sock) == (False, b"before")
        srv.signal(signal.SIGTERM)
        assert recv_frame(sock) == (True, b"server shutting down")
        assert sock.recv(10) == b""  # the server's close_notify: a clean end, no error
        assert srv.wait(15) == 0


def test_idle_timeout_over_tls(certs: Certs) -> None:
    with tls_server(certs, "--idle-timeout", "0.3") as srv, \
            tls_connect(srv, certs.client_context()) as sock:
        assert recv_frame(sock) == (True, b"idle timeout (0.3 s)")
        assert sock.recv(10) == b""


def test_workers_over_tls(certs: Certs) -> None:
    with tls_server(certs, "--workers", "2") as srv:
        for i in range(4):
            with tls_connect(srv, certs.client_context()) as sock:
                sock.sendall(frame(b"w%d" % i))
                assert recv_frame(sock) == (False, b"w%d" % i)


def test_token_authentication_inside_tls(certs: Certs, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-long-enough-0123\n")
    with tls_server(certs, "--auth-token-file", str(tokens)) as srv:
        with Client(*srv.address, tls=certs.client_context(),
                    token="a-token-long-enough-0123") as client:
            assert client.pipeline([b"one", b"two"]) == [b"one", b"two"]
        with tls_connect(srv, certs.client_context()) as sock:
            sock.sendall(frame(b"AUTH wrong-token-0123456789"))
            assert recv_frame(sock) == (True, b"authentication failed")
