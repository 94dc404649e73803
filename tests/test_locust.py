"""The Locust load test must count what goes wrong, not just what goes right.

Every run here is Locust as a user runs it (`python -m locust -f ...` in a
subprocess, headless, a few seconds, `--csv`), judged by the numbers in its
CSV report.  The servers are a real muxsrv on an ephemeral port, or a small
threaded stand-in that breaks the protocol on purpose (corrupted replies,
error frames, dropped connections) so that each kind of failure must show.

The checks themselves (loadtest/wire.py, loadtest/scenarios.py) are pure and
are tested directly with bytes; this process never imports Locust, which
would monkey-patch it with gevent.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, frame, recv_exact, running_server, wait_for

sys.path.insert(0, str(ROOT))  # `loadtest` is not installed with the package

from loadtest.scenarios import (
    SCENARIOS,
    check_exec_echo,
    expected_upper,
    random_text_or_bytes,
)
from loadtest.wire import (
    ERROR_BIT,
    GOODBYE,
    FrameDecoder,
    ProtocolError,
    WrongReply,
    encode_frame,
    parse_exec_reply,
)

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
REVERSE_LOCUSTFILE = ROOT / "loadtest" / "examples" / "reverse_locustfile.py"
# Locust needs a second or two to start and to write its reports after -t.
LOCUST_GRACE = 25.0

needs_locust = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="Locust is not installed: pip install -e '.[test]'",
)


# ---------------------------------------------------------------- running Locust


@dataclass
class LocustRun:
    returncode: int
    output: str
    rows: dict[tuple[str, str], dict[str, str]]  # (Type, Name) -> row of PREFIX_stats.csv
    errors: list[str]  # the Error column of PREFIX_failures.csv

    @property
    def requests(self) -> int:
        return int(self.rows[("", "Aggregated")]["Request Count"])

    @property
    def failures(self) -> int:
        return int(self.rows[("", "Aggregated")]["Failure Count"])

    def describe(self) -> str:
        return f"exit {self.returncode}; errors {self.errors}; output:\n{self.output[-3000:]}"


def locust_command(locustfile: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(locustfile), *options]


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group we started (Locust's --processes forks into it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def run_locust(
    tmp_path: Path,
    host: str,
    *options: str,
    locustfile: Path = LOCUSTFILE,
    users: int = 10,
    seconds: int = 3,
) -> LocustRun:
    """Run Locust headless against `host` for `seconds`; return its CSV figures."""
    proc = start_locust(tmp_path, host, *options, locustfile=locustfile, users=users,
                        seconds=seconds)
    return finish_locust(proc, tmp_path, seconds)


def start_locust(
    tmp_path: Path,
    host: str,
    *options: str,
    locustfile: Path = LOCUSTFILE,
    users: int = 10,
    seconds: int = 3,
) -> subprocess.Popen[bytes]:
    """Start Locust headless against `host` for `seconds`, its CSV files in `tmp_path`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    prefix = tmp_path / "locust"
    command = locust_command(
        locustfile,
        "--headless",
        "-u", str(users),
        "-r", str(users),
        "-t", f"{seconds}s",
        "--host", host,
        "--csv", str(prefix),
        "--only-summary",
        *options,
    )  # fmt: skip
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish_locust(proc: subprocess.Popen[bytes], tmp_path: Path, seconds: int) -> LocustRun:
    """Wait for a started Locust to end; its CSV figures."""
    prefix = tmp_path / "locust"
    try:
        out, _ = proc.communicate(timeout=seconds + LOCUST_GRACE)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        raise AssertionError(f"Locust did not stop within {seconds + LOCUST_GRACE} s") from None
    output = out.decode("utf-8", "replace")
    stats = prefix.with_name(prefix.name + "_stats.csv")
    assert stats.exists(), f"no {stats.name}; exit {proc.returncode}; output:\n{output[-3000:]}"
    with stats.open(newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    with prefix.with_name(prefix.name + "_failures.csv").open(newline="") as f:
        errors = [row["Error"] for row in csv.DictReader(f)]
    return LocustRun(proc.returncode, output, rows, errors)


def tcp(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


# ------------------------------------------------------- a stand-in that misbehaves

# reply(index on this connection, payload) -> bytes to send, or None to hang up;
# GOODBYE_FRAME: say goodbye and close at that boundary, as a draining muxsrv does.
ReplyPolicy = Callable[[int, bytes], bytes | None]


def error_frame(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">I", ERROR_BIT | len(data)) + data


GOODBYE_FRAME = error_frame(GOODBYE.decode())


@contextmanager
def stand_in_server(policy: ReplyPolicy) -> Iterator[tuple[str, int]]:
    """A thread-per-connection server on 127.0.0.1:0 that answers by `policy`."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            index = 0
            try:
                while True:
                    (size,) = struct.unpack(">I", recv_exact(sock, 4))
                    out = policy(index, recv_exact(sock, size))
                    if out is None:
                        return
                    sock.sendall(out)
                    if out == GOODBYE_FRAME:
                        # What the client sent after this is never read: drop it until
                        # the client closes (a lingering close, as muxsrv's).
                        sock.shutdown(socket.SHUT_WR)
                        while sock.recv(65536):
                            pass
                        return
                    index += 1
            except OSError:  # the client went away (EOF is a ConnectionError)
                return

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128

    with Server(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            host, port = server.server_address[:2]
            yield str(host), int(port)
        finally:
            server.shutdown()
            thread.join(10)


DROP_AFTER = 25  # replies per connection before the corrupting server hangs up


def corrupting(index: int, payload: bytes) -> bytes | None:
    """Echo, except: every 10th reply has a flipped bit, another is an error frame,
    and the connection is dropped after DROP_AFTER replies."""
    if index == DROP_AFTER:
        return None
    if index % 10 == 3:
        return frame(bytes([payload[0] ^ 1]) + payload[1:] if payload else b"!")
    if index % 10 == 6:
        return error_frame("stand-in refuses this message")
    return frame(payload)


GOOD_PER_CONNECTION = sum(1 for i in range(DROP_AFTER) if i % 10 not in (3, 6))


GOODBYE_AFTER = 5  # replies per connection before the stand-in says goodbye


def saying_goodbye(index: int, payload: bytes) -> bytes | None:
    """Echo GOODBYE_AFTER messages, then say goodbye instead of answering the next."""
    return GOODBYE_FRAME if index == GOODBYE_AFTER else frame(payload)


def reverse(index: int, payload: bytes) -> bytes | None:
    return frame(payload[::-1])


# ------------------------------------------------------------- runs against muxsrv


@needs_locust
@pytest.mark.parametrize(
    ("pipeline", "size"),
    [
        (1, 64),
        (8, 20_000),  # a 160 kB batch: sent by a second greenlet while replies are read
    ],
)
def test_echo_run_counts_requests_and_no_failures(tmp_path: Path, pipeline: int, size: int) -> None:
    report = tmp_path / "report.html"
    with running_server("--handler", "echo") as srv:
        run = run_locust(
            tmp_path,
            tcp(srv.host, srv.port),
            "--mux-pipeline", str(pipeline),
            "--mux-size", str(size),
            "--html", str(report),
        )  # fmt: skip
    assert run.returncode == 0, run.describe()
    assert run.requests > 100, run.describe()
    assert run.failures == 0, run.describe()
    name = f"random bytes {size} B"
    assert ("echo", name) in run.rows, run.rows.keys()
    assert name in report.read_text(errors="replace")


@needs_locust
def test_upper_run_has_no_failures(tmp_path: Path) -> None:
    # 33 bytes: text payloads get cut inside multi-byte characters and padded.
    with running_server("--handler", "upper") as srv:
        run = run_locust(
            tmp_path, tcp(srv.host, srv.port), "--mux-handler", "upper", "--mux-size", "33"
        )
    assert run.returncode == 0, run.describe()
    assert run.requests > 100, run.describe()
    assert run.failures == 0, run.describe()


@needs_locust
def test_echo_scenario_against_upper_server_fails_requests(tmp_path: Path) -> None:
    """The echo check is not vacuous: a server that changes replies is caught."""
    with running_server("--handler", "upper") as srv:
        run = run_locust(tmp_path, tcp(srv.host, srv.port), "--mux-handler", "echo", seconds=2)
    assert run.returncode == 1, run.describe()
    assert run.failures > run.requests // 2, run.describe()
    assert run.errors and all(e.startswith("WrongReply(") for e in run.errors), run.errors


@needs_locust
def test_exec_run_has_no_failures(tmp_path: Path) -> None:
    with ExitStack() as stack:
        try:
            srv = stack.enter_context(running_server("--handler", "exec"))
        except AssertionError as exc:
            pytest.skip(f"`python -m muxsrv --handler exec` does not start (yet): {exc}")
        run = run_locust(tmp_path, tcp(srv.host, srv.port), "--mux-handler", "exec", users=5)
    assert run.returncode == 0, run.describe()
    assert run.requests > 10, run.describe()
    assert run.failures == 0, run.describe()
    assert ("exec", "echo <token>") in run.rows, run.rows.keys()


@needs_locust
def test_processes_spread_users_and_add_up_requests(tmp_path: Path) -> None:
    with running_server("--handler", "echo") as srv:
        run = run_locust(tmp_path, tcp(srv.host, srv.port), "--processes", "2", users=20, seconds=4)
    assert run.returncode == 0, run.describe()
    assert run.requests > 100, run.describe()
    assert run.failures == 0, run.describe()
    assert "worker" in run.output.lower(), run.output[-3000:]


@needs_locust
def test_plugin_example_checks_its_own_handler(tmp_path: Path) -> None:
    handler = "loadtest.examples.reverse_handler:reverse"
    with running_server("--handler", handler) as srv:
        good = run_locust(tmp_path / "good", tcp(srv.host, srv.port), locustfile=REVERSE_LOCUSTFILE)
    assert good.returncode == 0, good.describe()
    assert good.failures == 0, good.describe()
    names = {name for kind, name in good.rows if kind == "reverse"}
    assert names == {"word", "random 1-4095 B", "10 in flight"}, good.rows.keys()
    with running_server("--handler", "echo") as srv:
        bad = run_locust(
            tmp_path / "bad", tcp(srv.host, srv.port), locustfile=REVERSE_LOCUSTFILE, seconds=2
        )
    assert bad.returncode == 1, bad.describe()
    assert bad.failures > 0, bad.describe()


# ------------------------------------------------------ runs against broken servers


@needs_locust
def test_corrupted_replies_error_frames_and_drops_are_failures(tmp_path: Path) -> None:
    users = 5
    with stand_in_server(corrupting) as (host, port):
        run = run_locust(tmp_path, tcp(host, port), users=users)
    assert run.returncode == 1, run.describe()
    assert 0 < run.failures < run.requests, run.describe()
    joined = "\n".join(run.errors)
    assert "WrongReply(" in joined, run.errors
    assert "ServerError('stand-in refuses this message')" in joined, run.errors
    assert "server closed the connection" in joined, run.errors
    # Each connection yields GOOD_PER_CONNECTION successes before the drop:
    # more than that per user means users reconnected.
    assert run.requests - run.failures > 2 * users * GOOD_PER_CONNECTION, run.describe()


@needs_locust
def test_pipelined_failures_are_counted_per_request(tmp_path: Path) -> None:
    with stand_in_server(corrupting) as (host, port):
        run = run_locust(tmp_path, tcp(host, port), "--mux-pipeline", "7", users=3, seconds=2)
    assert run.returncode == 1, run.describe()
    assert 0 < run.failures < run.requests, run.describe()
    assert "ServerError('stand-in refuses this message')" in "\n".join(run.errors), run.errors


@needs_locust
@pytest.mark.parametrize("pipeline", [1, 7])
def test_goodbye_is_not_a_failure_the_requests_in_flight_are_resent(
    tmp_path: Path, pipeline: int
) -> None:
    """Bug caught: the goodbye of a draining server counted as a failure, or the
    requests in flight resent wrongly (the echo check sees any reply out of place)."""
    users = 3
    with stand_in_server(saying_goodbye) as (host, port):
        run = run_locust(
            tmp_path, tcp(host, port), "--mux-pipeline", str(pipeline), users=users, seconds=2
        )
    assert run.returncode == 0, run.describe()
    assert run.failures == 0, run.describe()
    # More than a connection's worth per user: every user went through goodbyes.
    assert run.requests > 3 * users * GOODBYE_AFTER, run.describe()
    assert "is shutting down: reconnecting and resending" in run.output, run.output[-3000:]


@needs_locust
@pytest.mark.parametrize(("pipeline", "size"), [(1, 64), (8, 20_000)])
def test_a_server_restart_on_the_same_port_fails_nothing(
    tmp_path: Path, pipeline: int, size: int
) -> None:
    """Bug caught: requests failed (or lost) when the real server drains on SIGTERM and
    a new one takes over its port while the users keep sending."""
    users = 4
    first = ServerProcess(["--port", "0", "--handler", "echo", "--drain-timeout", "1"])
    servers = [first]
    proc: subprocess.Popen[bytes] | None = None
    try:
        first.wait_started()
        idle_fds = first.open_fds()
        proc = start_locust(
            tmp_path,
            tcp(first.host, first.port),
            "--mux-pipeline", str(pipeline),
            "--mux-size", str(size),
            users=users,
            seconds=10,
        )  # fmt: skip
        wait_for(lambda: first.open_fds() >= idle_fds + users, timeout=20,
                 what="every user connected to the first server")
        first.signal(signal.SIGTERM)
        assert first.wait(15) == 0, first.stderr_text()
        second = ServerProcess(["--port", str(first.port), "--handler", "echo"])
        servers.append(second)
        second.wait_started()
        idle_fds = second.open_fds()
        wait_for(lambda: second.open_fds() >= idle_fds + users or proc.poll() is not None,
                 timeout=20, what="every user connected to the second server")
        assert proc.poll() is None, "Locust ended before every user reached the new server"
        run = finish_locust(proc, tmp_path, 10)
    finally:
        if proc is not None:
            stop_group(proc)
        for srv in servers:
            with suppress(Exception):
                srv.stop()
    assert run.returncode == 0, run.describe()
    assert run.failures == 0, run.describe()
    assert run.requests > 100, run.describe()
    assert "is shutting down: reconnecting and resending" in run.output, run.output[-3000:]
    assert "shutting down: draining 4 connections" in first.stderr_text()


@needs_locust
def test_unreachable_server_fails_every_request_without_spinning(tmp_path: Path) -> None:
    # A bound socket that never listens: connections to its port are refused.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        run = run_locust(tmp_path, tcp("127.0.0.1", port), users=5, seconds=2)
    assert run.returncode == 1, run.describe()
    assert run.requests == run.failures > 0, run.describe()
    assert any("ConnectionRefusedError" in e for e in run.errors), run.errors
    # With the connect back-off a user retries about six times in 2 s;
    # without it, thousands of times.
    assert run.requests < 100, run.describe()


@needs_locust
def test_malformed_host_is_refused_at_start() -> None:
    proc = subprocess.run(
        locust_command(LOCUSTFILE, "--headless", "-u", "1", "-t", "1s", "--host", "http://x:1"),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=LOCUST_GRACE,
    )
    assert proc.returncode == 2, proc.stderr.decode()[-2000:]
    assert b"is not of the form tcp://HOST:PORT" in proc.stderr


@needs_locust
@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--mux-timeout", "0", "more than 0"),  # every batch would fail at once
        ("--mux-timeout", "nan", "more than 0"),
        ("--mux-timeout", "soon", "not a number of seconds"),
        ("--mux-pipeline", "0", "at least 1"),
        ("--mux-size", "-1", "from 0 to 64M"),
        ("--mux-size", "65M", "from 0 to 64M"),  # replies the client would take for corrupt
        ("--mux-handler", "nope", "invalid choice"),
    ],
)
def test_impossible_mux_option_is_refused_with_one_line(option: str, value: str, why: str) -> None:
    """Refused by Locust's parser, before any user starts (nothing listens on the
    port, so a run that started would log connect failures and the stats table)."""
    host = f"tcp://127.0.0.1:{free_port()}"
    command = locust_command(LOCUSTFILE, "--headless", "-u", "1", "-t", "5s", "--host", host)
    proc = subprocess.run(
        [*command, option, value],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=LOCUST_GRACE,
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err[-2000:]
    assert err.count("\n") == 1, err[-2000:]  # one line: no usage, no traceback
    # `locust: error: ...` (`__main__.py: ...` under python -m, as here)
    assert re.match(rf"\S+: error: argument {option}: ", err), err
    assert why in err, err
    assert proc.stdout == b"", proc.stdout[-2000:]


# ----------------------------------------------------------------------- web UI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bytes(response.read())
    except OSError:
        return None


@needs_locust
def test_web_ui_serves_its_page_and_runs_a_swarm(tmp_path: Path) -> None:
    web_port = free_port()
    base = f"http://127.0.0.1:{web_port}"
    with running_server("--handler", "upper") as srv:
        proc = subprocess.Popen(
            locust_command(LOCUSTFILE, "--web-host", "127.0.0.1", "--web-port", str(web_port)),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "locust.log").open("wb"),
            start_new_session=True,
        )
        try:
            page = wait_for(lambda: http_get(base + "/"), timeout=20, what="the web UI page")
            assert b"<html" in page.lower()
            for option in (b"mux_handler", b"mux_size", b"mux_pipeline"):
                assert option in page, f"{option!r} is not offered in the web UI"
            form = {
                "user_count": "5",
                "spawn_rate": "5",
                "host": tcp(srv.host, srv.port),
                "mux_handler": "upper",  # chosen in the form, not on the command line
            }
            body = urllib.parse.urlencode(form).encode()
            with urllib.request.urlopen(base + "/swarm", data=body, timeout=5) as response:
                assert json.load(response)["success"] is True

            def upper_stats() -> dict[str, object] | None:
                data = http_get(base + "/stats/requests")
                if not data:
                    return None
                for row in json.loads(data)["stats"]:
                    if row["method"] == "upper" and row["num_requests"] > 50:
                        return dict(row)
                return None

            row = wait_for(upper_stats, timeout=15, what="upper requests in the web UI stats")
            assert row["num_failures"] == 0, row
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                stop_group(proc)
    log = (tmp_path / "locust.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


# ----------------------------------------------- the checks, with plain bytes


def test_frame_decoder_whole_split_and_byte_at_a_time() -> None:
    payloads = [b"", b"a", b"hello" * 100, bytes(range(256))]
    stream = b"".join(encode_frame(p) for p in payloads) + error_frame("bad") + b"\x00\x00"
    for step in (len(stream), 7, 1):
        decoder = FrameDecoder()
        got = []
        for i in range(0, len(stream), step):
            decoder.receive_data(stream[i : i + step])
            while (f := decoder.maybe_next_frame()) is not None:
                got.append(f)
        assert [f.payload for f in got] == [*payloads, b"bad"], step
        assert [f.is_error for f in got] == [False] * len(payloads) + [True]
        assert decoder.buffered == 2  # the start of a length word waits for more


def test_frame_decoder_refuses_an_absurd_length() -> None:
    decoder = FrameDecoder(max_payload=1000)
    decoder.receive_data(struct.pack(">I", 1001))
    with pytest.raises(ProtocolError):
        decoder.maybe_next_frame()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"hello", b"HELLO"),
        ("straße ﬁn".encode(), b"STRASSE FIN"),  # longer when upper-cased
        ("héllo".encode(), "HÉLLO".encode()),
        (b"\xffabc\xc3", b"\xffABC\xc3"),  # not UTF-8: ASCII letters only
        (b"", b""),
    ],
)
def test_expected_upper(payload: bytes, expected: bytes) -> None:
    assert expected_upper(payload) == expected
    SCENARIOS["upper"].check(payload, expected)
    if expected != payload:
        with pytest.raises(WrongReply):
            SCENARIOS["upper"].check(payload, payload)


def test_upper_payloads_have_the_requested_size_and_mix_text_with_bytes() -> None:
    import random

    rng = random.Random(4)
    kinds = set()
    for size in (0, 1, 2, 3, 33, 1000):
        for _ in range(20):
            payload = random_text_or_bytes(rng, size)
            assert len(payload) == size
            try:
                kinds.add(("text", payload.decode("utf-8").isascii()))
            except UnicodeDecodeError:
                kinds.add(("bytes", False))
    assert ("text", False) in kinds and ("bytes", False) in kinds, kinds


def exec_reply(out: bytes, err: bytes = b"", **header: object) -> bytes:
    """An exec reply carrying `out` and `err`; `header` overrides (or breaks) header keys."""
    head = {
        "exit_code": 0,
        "stdout": len(out),
        "stderr": len(err),
        "timed_out": False,
        "truncated": False,
        **header,
    }
    data = json.dumps(head).encode()
    return struct.pack(">I", len(data)) + data + out + err


def test_exec_reply_is_parsed_and_checked() -> None:
    result = parse_exec_reply(exec_reply(b"out", b"err"))
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"out", b"err")
    check_exec_echo(b"echo abc", exec_reply(b"abc\n"))
    wrong = [
        exec_reply(b"abc\n", exit_code=1),
        exec_reply(b"abd\n"),
        exec_reply(b"abc\n", timed_out=True),
        exec_reply(b"abc\n", truncated=True),
        exec_reply(b"abc\n")[:-1],  # shorter than the header says
        exec_reply(b"abc\n", exit_code="0"),
        exec_reply(b"abc\n", stdout=3),  # counts disagree with the bytes
        b"\x00\x00",
        struct.pack(">I", 3) + b"{x}",
    ]
    for reply in wrong:
        with pytest.raises(WrongReply):
            check_exec_echo(b"echo abc", reply)
