"""``muxsrv-client`` as a user meets it: piped and typed input, what replies look like,
a connection the server closes between two messages, option mistakes, the README."""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from importlib import metadata

import pytest
from support import ROOT, ServerProcess, running_server, wait_for

import muxsrv
from muxsrv.client import main
from muxsrv.client_cli import build_parser, escape

pytestmark = pytest.mark.timeout(60)

README = (ROOT / "README.md").read_text(encoding="utf-8")


def run_client(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "muxsrv.client", *args], cwd=ROOT, capture_output=True,
        timeout=30, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
    )


# -- piped input ----------------------------------------------------------------------


@pytest.mark.parametrize("empty_lines", [False, True])
def test_piped_lines_get_one_reply_each_and_no_prompts(empty_lines: bool) -> None:
    """Bug caught: prompts ("> ") mixed into piped output; blank lines dropped even when
    asked for (or sent when not); a CRLF line's \\r sent as part of the message."""
    options = ["--empty-lines"] if empty_lines else []
    with running_server("--handler", "upper") as srv:
        run = run_client("--port", str(srv.port), *options, stdin=b"a\n\nb c\r\n \nlast")
    assert (run.returncode, run.stderr) == (0, b"")
    if empty_lines:
        assert run.stdout == b"A\n\nB C\n \nLAST\n"
    else:
        assert run.stdout == b"A\nB C\nLAST\n"


def test_piped_commands_for_exec_get_no_prompts() -> None:
    with running_server("--handler", "exec") as srv:
        run = run_client("--port", str(srv.port), "--exec", stdin=b"echo hi\n\nexit 4\n")
    assert (run.stdout, run.stderr, run.returncode) == (b"hi\n", b"", 4)


# -- what replies look like ---------------------------------------------------------------

NASTY = b"tab\there \x00\x1b[2J \xff \\ \xc3\xa9 \xe2\x80\x8b \xf0\x9f\x98\x80 end"


def test_replies_are_shown_as_text_with_what_is_not_printable_escaped() -> None:
    """Bug caught: a reply's control bytes (an escape sequence) written to the terminal
    as they are; a reply that is not UTF-8 garbled; escapes that cannot be told apart."""
    with running_server() as srv:
        port = str(srv.port)
        text = run_client("--port", port, stdin=NASTY + b"\n")
        hexed = run_client("--port", port, "--hex", stdin=NASTY + b"\n\n")
        raw = run_client("--port", port, "--raw", "--empty-lines", stdin=NASTY + b"\n\n")
    assert text.stdout == (
        "tab\\there \\x00\\x1b[2J \\xff \\\\ é \\u200b 😀 end\n".encode()
    ), text.stderr
    assert hexed.stdout == NASTY.hex(" ").encode() + b"\n", hexed.stderr
    assert raw.stdout == NASTY, raw.stderr  # exactly, nothing added (the empty reply too)


def test_escape() -> None:
    assert escape(b"plain text, \xc3\xa9") == "plain text, é"
    assert escape(b"two\nlines\r\n") == "two\\nlines\\r\\n"
    assert escape(b"\x7f\xc2\x85\xe2\x80\xae") == "\\x7f\\u0085\\u202e"  # DEL, NEL, RTL override
    assert escape("\U000e0001".encode()) == "\\U000e0001"
    assert escape(b"\\x41") == "\\\\x41"  # not to be read as the escape of "A"
    assert escape(b"\xed\xa0\x80") == "\\xed\\xa0\\x80"  # a surrogate's bytes are not UTF-8


# -- the prompt when the server closes the connection -----------------------------------


class Terminal:
    """``muxsrv-client`` on a pseudo-terminal, as typed at: it sees a tty and prompts."""

    def __init__(self, *args: str) -> None:
        master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "muxsrv.client", *args],
            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, start_new_session=True,
            env={**os.environ, "TERM": "dumb", "PYTHONPATH": str(ROOT)},
        )
        os.close(slave)
        self.fd = master
        self.output = b""
        self._pos = 0

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, needle: str, timeout: float = 15.0) -> str:
        """Wait for ``needle`` after the last one found; what came before it."""
        want = needle.encode()
        deadline = time.monotonic() + timeout
        while (found := self.output.find(want, self._pos)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {needle!r} in {timeout} s: {self.output!r}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the client has gone
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the client ended before {needle!r}: {self.output!r}")
                self.output += chunk
        before = self.output[self._pos : found]
        self._pos = found + len(want)
        return before.decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.fd)


def closed_by_peer(port: int) -> bool:
    """A client socket to 127.0.0.1:port has had the server's FIN (it is in CLOSE_WAIT)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(row[2] == f"0100007F:{port:04X}" and row[3] == "08" for row in rows)


def test_the_prompt_survives_a_restart_and_an_idle_timeout() -> None:
    """Bug caught: at the prompt, the server's idle-timeout error frame printed as if it
    were the reply to the next message, and the client exiting on the message after."""
    servers = [ServerProcess(["--port", "0", "--handler", "upper"])]
    term = None
    try:
        port = servers[0].wait_started().port
        term = Terminal("--port", str(port))
        term.expect("> ")
        term.type("hello\n")
        term.expect("HELLO")
        term.expect("> ")

        servers[0].signal(signal.SIGTERM)  # a restart on the same port
        wait_for(lambda: closed_by_peer(port), what="the goodbye")
        assert servers[0].wait() == 0
        servers.append(ServerProcess(["--port", str(port), "--handler", "upper",
                                      "--idle-timeout", "0.5"]))
        servers[1].wait_started()
        term.type("back\n")
        said = term.expect("BACK")
        assert (f"muxsrv-client: 127.0.0.1:{port} closed the connection: server shutting down; "
                "connecting again") in said
        term.expect("> ")

        servers[1].wait_log(r"idle for 0\.5 s")
        wait_for(lambda: closed_by_peer(port), what="the client's side closed by the server")
        term.type("again\n")
        said = term.expect("AGAIN")
        assert (f"muxsrv-client: 127.0.0.1:{port} closed the connection: idle timeout (0.5 s); "
                "connecting again") in said
        assert "server error" not in said
        term.expect("> ")
        term.type("\x04")  # Ctrl-D
        assert term.proc.wait(10) == 0
    finally:
        if term is not None:
            term.close()
        for srv in servers:
            with suppress(Exception):
                srv.stop()


# -- option checks ------------------------------------------------------------------------

TIMEOUT_RULE = "argument --timeout: must be a finite number of seconds, more than 0"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--port", "70000"], "argument --port: must be from 1 to 65535"),
        (["--port", "0"], "argument --port: must be from 1 to 65535"),
        (["--port", "http"], "argument --port: not a port number: 'http'"),
        (["--timeout", "0"], TIMEOUT_RULE),
        (["--timeout", "-1"], TIMEOUT_RULE),
        (["--timeout", "inf"], TIMEOUT_RULE),
        (["--timeout", "nan"], TIMEOUT_RULE),
        (["--timeout", "soon"], "argument --timeout: not a number of seconds: 'soon'"),
        (["--framing", "json"], "argument --framing: invalid choice: 'json' (choose from "),
        (["--hex", "--raw"], "argument --raw: not allowed with argument --hex"),
        (["--exec", "true", "--hex"], "--hex and --raw are for replies: --exec writes the "
                                      "output as it is"),
        (["--exec", "--framing", "line"], "--exec needs --framing length"),
        (["--framing", "line", "a\nb"], "with line framing a message cannot contain a newline"),
        (["--tim", "5", "x"], "unrecognized arguments: --tim"),  # no abbreviations
    ],
)
def test_option_mistakes_are_one_line(
    args: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug caught: a bad value taken (port 70000, a timeout of 0 that never waits) or a
    usage message and a traceback instead of one line and exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"muxsrv-client: error: {error}")  # (choices are quoted or not)
    assert err.endswith(" (see --help)\n") and err.count("\n") == 1


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        version = metadata.version("muxsrv")
    except metadata.PackageNotFoundError:
        version = muxsrv.__version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"muxsrv-client {version}\n"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_host_with_and_without_brackets() -> None:
    with running_server("--handler", "upper", "--host", "::1") as srv:
        for host in ("::1", "[::1]"):
            run = run_client("--host", host, "--port", str(srv.port), "hi")
            assert (run.returncode, run.stdout, run.stderr) == (0, b"HI\n", b""), host
    with socket.socket() as reserved:  # bound, never listening: refused
        reserved.bind(("127.0.0.1", 0))
        run = run_client("--host", "[::1]", "--port", str(reserved.getsockname()[1]), "hi")
    assert run.stderr.decode().startswith("muxsrv-client: error: cannot reach [::1]:")


# -- the README ---------------------------------------------------------------------------


def test_readme_exec_examples_print_what_they_mean() -> None:
    """Bug caught: a README example whose quoting does not survive the remote shell
    (`--exec -- printf '%s\\n' a b` prints `anbn`)."""
    examples = re.findall(r"^\$ (python -m muxsrv\.client --exec .*printf.*)$", README, re.M)
    assert examples
    with running_server("--handler", "exec") as srv:
        for example in examples:
            line = example.replace(
                "python -m muxsrv.client",
                f"{shlex.quote(sys.executable)} -m muxsrv.client --port {srv.port}", 1,
            )
            run = subprocess.run(["/bin/sh", "-c", line], cwd=ROOT, capture_output=True,
                                 timeout=30, stdin=subprocess.DEVNULL)
            assert (run.stdout, run.returncode) == (b"a\nb\n", 0), example


def test_readme_client_section_names_every_option() -> None:
    section = README.split("## The client", 1)[1].split("\n## ", 1)[0]
    for action in build_parser()._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert f"`{option}" in section, option
