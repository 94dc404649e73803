"""The command lines: start-up line, mistakes (one line, exit 2), signals, --version."""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from support import LISTEN_RE, ROOT, frame, recv_frame, running_server

from muxsrv import __version__, cli, client_cli, options

pytestmark = pytest.mark.timeout(60)


def run_muxsrv(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the server as a user does, for commands that end on their own."""
    return subprocess.run(
        [sys.executable, "-m", "muxsrv", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def test_unknown_handler_names_it_and_the_available_ones() -> None:
    """Bug caught: a traceback (or a silent echo server) for a mistyped --handler."""
    run = run_muxsrv("--handler", "uper", "--port", "0")
    assert run.returncode == 2
    assert run.stderr == (
        "muxsrv: error: unknown handler 'uper'; available: echo, exec, upper"
        " (or give package.module:attribute)\n"
    )
    assert run.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "argument --port: must be from 0 to 65535"),
        (["--port", "http"], "argument --port: not a port number: 'http'"),
        (["--max-frame", "0"], "argument --max-frame: must be from 1 to 2147483647"),
        (["--max-frame", "2G"], "argument --max-frame: must be from 1 to 2147483647"),
        (["--max-frame", "12X"], "argument --max-frame: not a size in bytes: '12X'"),
        (["--max-frame", ""], "argument --max-frame: not a size in bytes: ''"),
        (["--max-conns", "0"], "argument --max-conns: must be at least 1"),
        (["--max-conns", "1.5"], "argument --max-conns: not a whole number: '1.5'"),
        (["--idle-timeout", "-1"], "argument --idle-timeout: must be a finite number"),
        (["--idle-timeout", "nan"], "argument --idle-timeout: must be a finite number"),
        (["--drain-timeout", "inf"], "argument --drain-timeout: must be a finite number"),
        (["--drain-timeout", "soon"], "argument --drain-timeout: not a number of seconds"),
        (["--framing", "json"], "argument --framing: invalid choice: 'json'"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["--workers", "-1"], "argument --workers: must be 0 (one per CPU) or more"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--handler"], "argument --handler: expected one argument"),
        # No abbreviations, in either parsing step, nor for a handler's own options:
        (["--h"], "unrecognized arguments: --h"),
        (["--ver"], "unrecognized arguments: --ver"),
        (["--handler", "exec", "--exec-t"], "unrecognized arguments: --exec-t"),
        (["--host", ""], "argument --host: empty; for every address give 0.0.0.0 (IPv4) or ::"),
    ],
)
def test_bad_values_one_line_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug caught: a bad value starting a server with a default, or a usage dump/traceback
    instead of one line saying what is wrong."""
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("muxsrv: error: "), err
    assert message in err


def test_bad_value_in_a_real_process() -> None:
    run = run_muxsrv("--max-frame", "3G")
    assert run.returncode == 2
    assert run.stderr == (
        "muxsrv: error: argument --max-frame: must be from 1 to 2147483647 (2^31-1) bytes"
        " (see --help)\n"
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [("100", 100), ("1k", 1024), ("16M", 16 << 20), ("2KiB", 2048), ("1g", 1 << 30),
     ("64kb", 64 << 10)],
)
def test_parse_size(text: str, value: int) -> None:
    assert cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1.5M", "ten", "1T"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)


def test_startup_line() -> None:
    """Bug caught: the start-up line missing, wrong, or naming a port that is not ours."""
    with running_server("--handler", "upper", "--framing", "line") as srv:
        line = srv.lines[0]
        assert line == (
            f"muxsrv: listening on 127.0.0.1:{srv.port} (handler upper (built-in), framing line)"
        )
        assert srv.port != 0
        with srv.connect() as sock:
            sock.sendall(b"up\n")
            assert sock.recv(10) == b"UP\n"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_port_is_one_line_exit_2(workers: str) -> None:
    """Bug caught: a busy port ending in a traceback, or not reported as a mistake (2)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = run_muxsrv("--port", str(port), "--workers", workers)
    assert run.returncode == 2
    assert run.stderr == (
        f"muxsrv: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cannot_listen_is_one_line_exit_1(workers: str) -> None:
    """Bug caught: an address that is not ours ending in a traceback, or exit 0."""
    run = run_muxsrv("--host", "192.0.2.1", "--port", "0", "--workers", workers)  # TEST-NET-1
    assert run.returncode == 1
    assert run.stderr == (
        "muxsrv: error: cannot listen on 192.0.2.1:0: Cannot assign requested address\n"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("host", "reason"),
    [("no.such.host.invalid", ""), ("a..b", "not a valid host name")],  # RFC 2606; bad IDNA
)
def test_a_host_that_does_not_resolve_is_one_line_exit_2(
    host: str, reason: str, workers: str
) -> None:
    """Bug caught: an unresolvable --host ending in a traceback (an invalid name), or not
    reported as the mistake in the command line that the README says it is (exit 2)."""
    run = run_muxsrv("--host", host, "--port", "0", "--workers", workers)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith(f"muxsrv: error: cannot listen on {host}:0: {reason}")


def test_client_takes_no_abbreviations(capsys: pytest.CaptureFixture[str]) -> None:
    """Bug caught: `--ho x` quietly taken as `--host x` (and `--h` as whichever came first)."""
    with pytest.raises(SystemExit) as info:
        client_cli.build_parser().parse_args(["--ho", "example.org", "hello"])
    assert info.value.code == 2
    assert "unrecognized arguments: --ho" in capsys.readouterr().err


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


@pytest.mark.parametrize(("module", "prog"), [("muxsrv", "muxsrv"),
                                              ("muxsrv.client", "muxsrv-client")])
def test_version(module: str, prog: str) -> None:
    """Bug caught: a program without --version, or printing another version than the one
    the project declares."""
    run = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert (run.returncode, run.stdout, run.stderr) == (0, f"{prog} {project_version()}\n", "")


def test_version_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug caught: --version failing from a checkout that was never installed, or the
    package's own version drifting from pyproject.toml's."""

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert options.program_version("muxsrv") == f"muxsrv {project_version()}"
    assert __version__ == project_version()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly(signum: int) -> None:
    """Bug caught: SIGINT ending in a KeyboardInterrupt traceback, or a non-zero exit."""
    with running_server() as srv:
        with srv.connect() as sock:
            sock.sendall(frame(b"x"))
            assert recv_frame(sock) == (False, b"x")
        srv.signal(signum)
        assert srv.wait() == 0
        log = srv.final_log()
        assert "Traceback" not in log
        assert log.splitlines()[-1].endswith("muxsrv INFO: stopped")
        assert LISTEN_RE.search(log.splitlines()[0])
