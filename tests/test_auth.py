"""Token authentication: the gate's state machine on a fake socket and clock, the token
file, and a real server (CLI refusals, SIGHUP rotation, the clients, a clean log)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from muxsrv import auth
from muxsrv.auth import (
    AUTH_FAILED,
    AUTH_REQUIRED,
    AUTH_TIMEOUT,
    LOCKED_OUT,
    FailureLedger,
    Gate,
    TokenFileError,
    Tokens,
    read_token_file,
)
from muxsrv.client import Client, ServerError
from muxsrv.codec import ErrorFrame
from muxsrv.connection import Connection
from muxsrv.handler import Conn, Handler
from muxsrv.testing import FakeClock, Harness, frame
from tests.support import ROOT, recv_frame, running_server

TOKEN = b"s3cret-token-0123456789"
OTHER = b"another-token-abcdefghij"


class Recorder(Handler):
    """Echoes; records what it was told."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def connection_made(self, conn: Conn) -> None:
        self.events.append("made")
        conn.send(b"hello")

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self.events.append(payload)
        conn.send(payload)


def token_file(tmp_path: Path, *lines: bytes, name: str = "tokens") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def gate_for(tmp_path: Path, framing: str = "length", timeout: float = 10.0) -> Gate:
    return Gate(framing, Tokens(str(token_file(tmp_path, TOKEN))), timeout)


def ended(h: Harness) -> bool:
    """The connection closed (its lingering close ends at the peer's EOF)."""
    h.sock.peer_shuts_down()
    h.run()
    return h.closed == 1


def errors(replies: list[bytes]) -> list[str]:
    return [r.text for r in replies if isinstance(r, ErrorFrame)]


# -- the gate ---------------------------------------------------------------------


def test_success_then_the_handler_is_told_and_the_path_is_plain(tmp_path: Path) -> None:
    with Harness(Recorder, gate=gate_for(tmp_path)) as h:
        h.run()
        assert h.handler is not None
        assert h.handler.events == []  # never sees an unauthenticated client
        h.peer_sends(frame(b"AUTH " + TOKEN))
        h.run()
        assert h.replies() == [b"OK", b"hello"]
        assert type(h.conn) is Connection  # no stage, no wrapper: the plain hot path
        h.peer_sends(frame(b"x"))
        h.run()
        assert h.replies() == [b"x"] and h.handler.events == ["made", b"x"]


@pytest.mark.parametrize("framing", ["length", "line"])
def test_auth_pipelined_split_at_every_byte(tmp_path: Path, framing: str) -> None:
    if framing == "length":
        data = frame(b"AUTH " + TOKEN) + frame(b"one") + frame(b"two" * 2000)
        want = [b"OK", b"hello", b"one", b"two" * 2000]
    else:
        data = b"AUTH " + TOKEN + b"\none\ntwo\n"
        want = [b"OK", b"hello", b"one", b"two"]
    gate = gate_for(tmp_path, framing)
    byte_at_a_time = [data[i:i + 1] for i in range(len(data))]
    for cut in [*range(len(data) + 1), -1]:
        with Harness(Recorder, gate=gate, framing=framing) as h:
            if cut < 0:
                h.peer_sends(*byte_at_a_time)
            else:
                h.peer_sends(*(part for part in (data[:cut], data[cut:]) if part))
            h.run()
            if framing == "length":
                assert h.replies() == want, cut
            else:
                assert bytes(h.sock.sent).split(b"\n")[:-1] == want, cut
            assert h.closed == 0


def test_a_function_handler_behind_the_gate(tmp_path: Path) -> None:
    with Harness(function=bytes.upper, gate=gate_for(tmp_path)) as h:
        h.peer_sends(frame(b"AUTH " + TOKEN) + frame(b"abc"), frame(b"def"))
        h.run()
        assert h.replies() == [b"OK", b"ABC", b"DEF"] and type(h.conn) is Connection


def test_wrong_and_empty_tokens_fail(tmp_path: Path) -> None:
    gate = gate_for(tmp_path)
    for message in (b"AUTH wrong-token-0123456789", b"AUTH ", b"AUTH " + TOKEN + b"x"):
        with Harness(Recorder, gate=gate) as h:
            h.peer_sends(frame(message) + frame(b"after"))
            h.run()
            assert errors(h.replies()) == [AUTH_FAILED] and ended(h)
            assert h.handler is not None and h.handler.events == []


def test_other_first_message_is_refused(tmp_path: Path) -> None:
    for message in (b"hello", b"auth " + TOKEN, b"AUTH" + TOKEN):
        with Harness(Recorder, gate=gate_for(tmp_path)) as h:
            h.peer_sends(frame(message))
            h.run()
            assert errors(h.replies()) == [AUTH_REQUIRED] and ended(h)


def test_line_framing_refusal_closes_without_a_frame(tmp_path: Path) -> None:
    with Harness(Recorder, gate=gate_for(tmp_path, "line"), framing="line") as h:
        h.peer_sends(b"hello\n")
        h.run()
        assert bytes(h.sock.sent) == b"" and ended(h)


def test_oversized_first_frame_refused_on_its_prefix(tmp_path: Path) -> None:
    with Harness(Recorder, gate=gate_for(tmp_path)) as h:
        [stage] = h.conn._stages.stages if h.conn._stages else []
        h.peer_sends((1 << 30).to_bytes(4, "big") + b"x" * 500)  # judged on the prefix
        h.run()
        [text] = errors(h.replies())
        assert f"{1 << 30} bytes" in text and ended(h)
        assert stage._buffer == b""  # nothing of it kept
    with Harness(Recorder, gate=gate_for(tmp_path)) as h:
        h.peer_sends(frame(b"AUTH " + b"x" * 1019))  # 1024 bytes: allowed, judged
        h.run()
        assert errors(h.replies()) == [AUTH_FAILED]


def test_long_line_before_auth_refused_unbuffered(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, "line")
    with Harness(Recorder, gate=gate, framing="line") as h:
        h.peer_sends(b"A" * 600, b"A" * 600)
        h.run()
        assert ended(h)


def test_timeout(tmp_path: Path) -> None:
    with Harness(Recorder, gate=gate_for(tmp_path, timeout=5)) as h:
        h.peer_sends(frame(b"AUTH ")[:6])  # a partial AUTH does not count
        h.advance(4.9)
        assert h.closed == 0 and h.replies() == []
        h.advance(0.2)
        assert errors(h.replies()) == [AUTH_TIMEOUT]
        assert ended(h)
    with Harness(Recorder, gate=gate_for(tmp_path, timeout=5)) as h:
        h.peer_sends(frame(b"AUTH " + TOKEN))
        h.run()
        h.advance(6)
        assert h.closed == 0 and h.replies() == [b"OK", b"hello"]


def test_brute_force_lock_out_and_its_expiry(tmp_path: Path) -> None:
    gate = gate_for(tmp_path)
    clock = FakeClock()
    attacker = ("192.0.2.7", 5000)

    def attempt(token: bytes, peer: tuple[str, int] = attacker) -> list[bytes]:
        with Harness(Recorder, gate=gate, peer=peer, clock=clock) as h:
            h.peer_sends(frame(b"AUTH " + token))
            h.run()
            return h.replies()

    for _ in range(9):
        assert errors(attempt(b"wrong-token-0123456789")) == [AUTH_FAILED]
    assert attempt(TOKEN)[0] == b"OK"  # nine: not yet
    assert errors(attempt(b"wrong-token-0123456789")) == [AUTH_FAILED]  # the tenth
    assert errors(attempt(TOKEN)) == [LOCKED_OUT]  # even the right token, for 60 s
    assert attempt(TOKEN, ("192.0.2.8", 1))[0] == b"OK"  # other addresses are served
    clock.advance(59.9)
    assert errors(attempt(TOKEN)) == [LOCKED_OUT]
    clock.advance(0.2)
    assert attempt(TOKEN)[0] == b"OK"


def test_failures_outside_the_window_do_not_add_up() -> None:
    ledger = FailureLedger()
    for i in range(20):
        assert not ledger.failed("a", i * 7.0)  # 9 per 63 s at most
    assert not ledger.locked("a", 200.0)


def test_ledger_is_bounded() -> None:
    ledger = FailureLedger(max_entries=100)
    for i in range(10_000):
        ledger.failed(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(ledger) <= 100
    for _ in range(10):
        locked = ledger.failed("victim", 1.0)
    assert locked and ledger.locked("victim", 2.0)


def test_tokens_compare_every_digest(tmp_path: Path) -> None:
    tokens = Tokens(str(token_file(tmp_path, TOKEN, OTHER)))
    assert tokens.accepts(TOKEN) and tokens.accepts(OTHER)
    assert not tokens.accepts(b"") and not tokens.accepts(TOKEN[:-1])


# -- the token file -------------------------------------------------------------------


def test_token_file_parsing(tmp_path: Path) -> None:
    path = token_file(tmp_path, b"# a comment", b"", b"  " + TOKEN + b"  \r", b"   ", OTHER)
    assert len(read_token_file(str(path))) == 2
    for lines, why in (
        ((b"# only a comment", b""), "no token"),
        ((), "no token"),
        ((TOKEN, b"short-token"), "line 2"),
    ):
        with pytest.raises(TokenFileError, match=why) as caught:
            read_token_file(str(token_file(tmp_path, *lines, name="bad")))
        assert "short-token" not in str(caught.value)
    with pytest.raises(TokenFileError, match="No such file"):
        read_token_file(str(tmp_path / "missing"))


def start(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "muxsrv", "--port", "0", *args], capture_output=True, text=True,
        cwd=ROOT, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_cli_refusals(tmp_path: Path) -> None:
    short = token_file(tmp_path, b"short-secret", name="short")
    empty = token_file(tmp_path, b"# nothing", name="empty")
    good = token_file(tmp_path, TOKEN, name="good")
    for args, why in (
        (["--auth-token-file", str(short)], "at least 16 bytes"),
        (["--auth-token-file", str(empty)], "no token"),
        (["--auth-token-file", str(tmp_path / "missing")], "--auth-token-file"),
        (["--auth-token-file", str(good), "--framing", "raw"], "--framing"),
        (["--handler", "exec", "--host", "0.0.0.0", "--allow-remote-exec"], "--auth-token-file"),
    ):
        done = start(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and why in lines[0], done.stderr
        assert "short-secret" not in done.stderr and TOKEN.decode() not in done.stderr


# -- a real server --------------------------------------------------------------------


def authed(address: tuple[str, int], token: bytes) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(frame(b"AUTH " + token))
    return sock


def test_rotation_by_sighup(tmp_path: Path) -> None:
    path = token_file(tmp_path, TOKEN)
    with running_server("--auth-token-file", str(path), "--log-level", "debug") as srv:
        old = authed(srv.address, TOKEN)
        assert recv_frame(old) == (False, b"OK")
        path.write_bytes(OTHER + b"\n")
        srv.signal(signal.SIGHUP)
        srv.wait_log(r"re-read --auth-token-file: 1 tokens")
        with authed(srv.address, OTHER) as new:
            assert recv_frame(new) == (False, b"OK")
        with authed(srv.address, TOKEN) as removed:
            assert recv_frame(removed) == (True, AUTH_FAILED.encode())
        old.sendall(frame(b"still here"))  # authenticated connections stay
        assert recv_frame(old) == (False, b"still here")
        path.write_bytes(b"too-short\n")
        srv.signal(signal.SIGHUP)
        srv.wait_log(r"keeping the 1 tokens")
        with authed(srv.address, OTHER) as kept:
            assert recv_frame(kept) == (False, b"OK")
        old.close()
        assert srv.stop() == 0
        log = srv.final_log()
    for secret in (TOKEN, OTHER, b"too-short"):
        assert secret.decode() not in log
    assert "token authentication" in log


def test_sighup_reloads_every_worker(tmp_path: Path) -> None:
    """With --workers, SIGHUP starts new workers, which read the token file afresh."""
    path = token_file(tmp_path, TOKEN)
    with running_server("--auth-token-file", str(path), "--workers", "2") as srv:
        srv.wait_log(r"generation 1 serving")
        path.write_bytes(OTHER + b"\n")
        srv.signal(signal.SIGHUP)
        srv.wait_log(r"reload: generation 2 serving", timeout=30)
        srv.wait_log(r"reload: generation 1 drained", timeout=30)
        for _ in range(4):  # whichever worker takes it
            with authed(srv.address, OTHER) as sock:
                assert recv_frame(sock) == (False, b"OK")


def test_client_library_and_command_line(tmp_path: Path) -> None:
    path = token_file(tmp_path, TOKEN)
    with running_server("--auth-token-file", str(path)) as srv:
        host, port = srv.address
        with Client(host, port, token=TOKEN) as client:
            assert client.request(b"ping") == b"ping"
        with Client(host, port, token=TOKEN.decode()) as client:
            assert client.request(b"pong") == b"pong"
        with pytest.raises(ServerError, match=AUTH_FAILED), Client(host, port, token=OTHER):
            pass
        with Client(host, port) as client, pytest.raises(ServerError, match=AUTH_REQUIRED):
            client.request(b"ping")
        base = [sys.executable, "-m", "muxsrv.client", "--host", host, "--port", str(port)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MUXSRV_TOKEN", None)
        done = subprocess.run([*base, "--token-file", str(path), "hi"], capture_output=True,
                              text=True, env=env, timeout=30)
        assert done.returncode == 0 and done.stdout == "hi\n", done.stderr
        done = subprocess.run([*base, "hi"], capture_output=True, text=True,
                              env={**env, "MUXSRV_TOKEN": TOKEN.decode()}, timeout=30)
        assert done.returncode == 0 and done.stdout == "hi\n", done.stderr
        done = subprocess.run([*base, "hi"], capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode != 0 and AUTH_REQUIRED in done.stderr
        assert srv.stop() == 0
        assert TOKEN.decode() not in srv.final_log()


def test_line_framing_on_a_real_server(tmp_path: Path) -> None:
    path = token_file(tmp_path, TOKEN)
    with running_server("--auth-token-file", str(path), "--framing", "line") as srv, \
            socket.create_connection(srv.address, timeout=10) as sock:
        sock.sendall(b"AUTH " + TOKEN + b"\nhello\n")
        data = b""
        while data.count(b"\n") < 2:
            chunk = sock.recv(100)
            assert chunk
            data += chunk
        assert data == b"OK\nhello\n"


def test_module_constants_are_the_issue_s() -> None:
    assert auth.MAX_FAILURES == 10 and auth.FAILURE_WINDOW == 60 and auth.LOCKOUT == 60
    assert auth.MAX_AUTH_MESSAGE == 1024 and auth.MIN_TOKEN_BYTES == 16


def test_connections_that_leave_before_auth_leave_no_timer(tmp_path: Path) -> None:
    from muxsrv.loop import EventLoop
    from muxsrv.server import Server, Settings

    loop = EventLoop()
    try:
        gate = gate_for(tmp_path)
        server = Server(loop, Settings(port=0), factory=Recorder, gate=gate)
        [address] = server.listen()
        clients = [socket.create_connection(address) for _ in range(20)]
        loop.run_until(lambda: len(server._conns) == 20, 10)
        for sock in clients:
            sock.close()
        assert loop.run_until(lambda: not server._conns, 10)
        live = [t for t in loop._timers if t._callback is auth._expire]
        assert live == [] and gate._timers == {}
    finally:
        loop.close()
