r"""``muxsrv-client`` (``python -m muxsrv.client``): the client library's command line.

What it sends: each MESSAGE argument is one message; with none, each line of
stdin is one: at an interactive prompt on a terminal (line editing and
history), or with no prompts when stdin is piped.  Blank lines are skipped
unless ``--empty-lines``.  With ``--exec``, like ``ssh host COMMAND``.  With
``--stat``, nothing: a line a second from the admin port (``client_stat.py``).

What it prints: one line per reply, as text, with whatever is not printable
escaped as Python writes it (``\n``, ``\x00``, ``\u200b``, a backslash as
``\\``; a byte that is not UTF-8 as ``\xff``), so one reply is one line and
no reply reaches a terminal as a control sequence.  ``--hex`` prints each
reply in hex; ``--raw`` writes the bytes as they are, with nothing added.

A connection the server closed between two messages (idle timeout, restart)
is reported in one line when the next message is about to go, and a new one
takes its place.  At a prompt, so does one lost to a timeout or a reset, and
the prompt goes on; elsewhere that ends the run.  With ``--udp``, each message
is one datagram, sent again after each ``--timeout`` (1 s) with no reply, up
to ``--retries`` (2) times; one lost for good is reported and the next goes
on.  Option values are checked as the server's are: a mistake is one line and
exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import ssl
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import NoReturn

from . import client_stat
from .address import format_address
from .client import DEFAULT_TIMEOUT, Client, ReplyError, ServerError, ServerGone
from .client_udp import DEFAULT_RETRIES, DEFAULT_UDP_TIMEOUT, UdpClient
from .framing import FRAMINGS
from .options import positive_seconds, program_version, whole_number

__all__ = ["build_parser", "escape", "main"]

PROG = "muxsrv-client"
#: Exit status for "no server" and protocol errors with --exec, as ssh uses it.
EXEC_FAILURE = 255
#: Exit status after Ctrl-C, as a shell reports SIGINT.
INTERRUPTED = 130


# -- options ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Mistakes in one line, as the server's parser (muxsrv.cli) says them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_port = whole_number(1, 65535, "must be from 1 to 65535", "a port number")
_retries = whole_number(0, 100, "must be from 0 to 100")


def _host(text: str) -> str:
    """A name or an address; an IPv6 address also as URLs write it, in brackets."""
    return text[1:-1] if text.startswith("[") and text.endswith("]") else text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Send each MESSAGE to a muxsrv server and print each reply on its own "
        "line; with no MESSAGE, each line of stdin (an interactive prompt on a terminal).",
        epilog="With --exec (a server started with --handler exec): like `ssh host COMMAND`, "
        "the remote stdout and stderr go to this stdout and stderr and the exit status is the "
        "command's (killed by signal N: 128+N; timed out: 124; no server or a protocol "
        "error: 255).",
    )
    add = parser.add_argument
    add("messages", nargs="*", metavar="MESSAGE")
    add("--host", type=_host, default="127.0.0.1",
        help="name or address; IPv6 as ::1 or [::1] (default: 127.0.0.1)")
    add("--port", type=_port, default=9999, help="(default: 9999)")
    add("--framing", choices=FRAMINGS, default="length", help="as the server's (default: length)")
    add("--timeout", type=positive_seconds, default=None, metavar="SECONDS",
        help="seconds to wait for the connection and each reply (default: 10; with --exec, "
        "10 to connect and no limit on the reply, which the server's --exec-timeout bounds)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--hex", dest="show", action="store_const", const="hex",
                       help="print each reply in hex (default: as text, what is not "
                       "printable escaped)")
    shown.add_argument("--raw", dest="show", action="store_const", const="raw",
                       help="write each reply's bytes as they are, with nothing added")
    add("--empty-lines", action="store_true",
        help="from stdin, send blank lines too, an empty one as an empty message "
        "(default: skip them)")
    add("--exec", nargs="?", const="", metavar="COMMAND",
        help="run COMMAND (and any MESSAGE words after it, joined with spaces, as ssh does) "
        "on an exec server; with no COMMAND, each line of stdin (a $ prompt on a terminal)")
    add("--token-file", metavar="FILE",
        help="authenticate with the first token in FILE (a server with --auth-token-file); "
        "default: the environment variable MUXSRV_TOKEN, if set")
    add("--udp", action="store_true",
        help="send each message as one datagram to a server with --udp (no framing); one "
        "request in flight, sent again after each --timeout (default here: 1) with no reply")
    add("--retries", type=_retries, default=None, metavar="N",
        help="with --udp, how many times a request with no reply is sent again (default: 2)")
    add("--tls", action="store_true",
        help="speak TLS; the server's certificate and host name are verified")
    add("--tls-ca", metavar="FILE",
        help="with --tls: trust the CAs in this PEM file (default: the system's)")
    add("--tls-cert", metavar="FILE",
        help="with --tls: present this client certificate (a server with --tls-client-ca)")
    add("--tls-key", metavar="FILE", help="the client certificate's key, if not in --tls-cert")
    client_stat.add_options(parser)
    add("--version", action="version", version=program_version(PROG))
    parser.set_defaults(show="text")
    return parser


# -- showing replies ----------------------------------------------------------

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(reply: bytes) -> str:
    """``reply`` as one line of printable text (see the module's docstring)."""
    text = reply.decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _reply_writer(show: str) -> Callable[[bytes], None]:
    out = sys.stdout.buffer

    def write(reply: bytes) -> None:
        if show == "raw":
            out.write(reply)
        elif show == "hex":
            out.write(reply.hex(" ").encode("ascii") + b"\n")
        else:
            out.write(escape(reply).encode("utf-8") + b"\n")
        out.flush()

    return write


def _say(text: str) -> None:
    sys.stdout.flush()  # after what came before it
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _escape_text(text: str) -> str:
    return escape(text.encode("utf-8", "surrogateescape"))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ServerGone) and exc.__cause__ is not None:
        exc = exc.__cause__
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


# -- the connection behind the messages ----------------------------------------


class _Session:
    """One message at a time over one connection, kept up to date between messages.

    Before each message, a connection the server has closed meanwhile (idle
    timeout, restart) is reported in one line and replaced.  A message whose
    reply did not come (a timeout, a reset) leaves the connection out of step:
    it is dropped, and replaced before the next message only if ``survive`` (at
    a prompt); else nothing more is sent (``over``).
    """

    def __init__(self, client: Client, where: str, *, survive: bool, failure: int) -> None:
        self.client = client
        self.where = where
        self.survive = survive
        self.failure = failure
        self.replace = False  # connect again before the next message
        self.over = False

    def run(self, action: Callable[[Client], int]) -> int:
        """``action``'s status, or ``failure`` once what went wrong is said."""
        if self.over or not self._ready():
            return self.failure
        client = self.client
        try:
            return action(client)
        except ServerError as exc:
            why = client.closed_by_server()
            if why is None:
                _say(f"server error: {_escape_text(exc.message)}")
            else:  # not an answer: why the server closed the connection
                self._closed(why or exc.message)
                self.replace = True
        except TimeoutError as exc:
            if isinstance(client, UdpClient):
                _say(f"error: {self.where}: {exc}")  # how many tries of how long
            else:
                _say(f"error: {self.where}: timed out after {client.timeout or 0:g} s")
            self._drop()
        except (ReplyError, OSError) as exc:  # ConnectionClosed, ServerGone, a reset ...
            _say(f"error: {self.where}: {_reason(exc)}")
            self._drop()
        return self.failure

    def _ready(self) -> bool:
        if not self.replace:
            why = self.client.closed_by_server()
            if why is None:
                return True
            self._closed(why, "; connecting again")
        try:
            self.client.reconnect()
        except OSError as exc:
            _say(f"error: cannot reach {self.where}: {_reason(exc)}")
            self.replace = True
            self.over = not self.survive
            return False
        self.replace = False
        return True

    def _closed(self, why: str, then: str = "") -> None:
        told = f": {_escape_text(why)}" if why else ""
        _say(f"{self.where} closed the connection{told}{then}")

    def _drop(self) -> None:
        self.client.abort()  # a late reply must not pass for the next message's
        self.replace = True
        self.over = not self.survive


def _lines(interactive: bool, prompt: str) -> Iterator[bytes]:
    """The lines of stdin; at a terminal, read at a prompt with line editing."""
    if not interactive:
        for line in sys.stdin.buffer:
            yield line.removesuffix(b"\n").removesuffix(b"\r")
        return
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return
        yield line.encode("utf-8", "surrogateescape")


# -- main ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.stat:
        if options.exec is not None or options.messages:
            parser.error("--stat sends nothing: no MESSAGE, no --exec")
        host, port = options.admin
        timeout = 5.0 if options.timeout is None else options.timeout
        return client_stat.run(host, port, interval=options.interval, timeout=timeout,
                               token=_token(parser, options.token_file))
    exec_mode = options.exec is not None
    if exec_mode and options.framing != "length":
        parser.error("--exec needs --framing length")
    if exec_mode and options.show != "text":
        parser.error("--hex and --raw are for replies: --exec writes the output as it is")
    if options.framing == "line" and any("\n" in m for m in options.messages):
        parser.error("with line framing a message cannot contain a newline")
    command = " ".join(word for word in (options.exec, *options.messages) if word)
    interactive = not (command if exec_mode else options.messages) and sys.stdin.isatty()
    failure = EXEC_FAILURE if exec_mode else 1
    where = format_address((options.host, options.port))
    if options.udp:
        return _udp_main(parser, options, where, interactive)
    if options.retries is not None:
        parser.error("--retries is for --udp (TCP does not lose messages)")
    timeout = DEFAULT_TIMEOUT if options.timeout is None else options.timeout
    token = _token(parser, options.token_file)
    tls = _tls_context(parser, options)
    try:
        client = Client(
            options.host, options.port, options.framing, connect_timeout=timeout, token=token,
            tls=tls if tls is not None else False,
            # With --exec the server's --exec-timeout bounds the command; ours only if asked.
            timeout=options.timeout if exec_mode else timeout,
        )
    except TimeoutError:
        _say(f"error: cannot reach {where}: timed out after {timeout:g} s")
        return failure
    except ServerError as exc:
        _say(f"error: {where}: {exc.message}")
        return failure
    except ssl.SSLError as exc:
        reason = getattr(exc, "verify_message", None) or exc.reason or exc
        _say(f"error: {where}: TLS failed: {reason}")
        return failure
    except OSError as exc:
        _say(f"error: cannot reach {where}: {_reason(exc)}")
        return failure
    with client:
        session = _Session(client, where, survive=interactive, failure=failure)
        try:
            if exec_mode:
                return _exec_main(session, options, command, interactive)
            return _messages_main(session, options, interactive)
        except KeyboardInterrupt:
            if interactive:
                print()
            client.abort()  # with --exec, the reset tells the server to kill the command
            return INTERRUPTED


def _udp_main(parser: argparse.ArgumentParser, options: argparse.Namespace, where: str,
              interactive: bool) -> int:
    for flag, given in (("--exec", options.exec is not None), ("--tls", options.tls),
                        ("--tls-ca", options.tls_ca), ("--tls-cert", options.tls_cert),
                        ("--token-file", options.token_file)):
        if given:
            parser.error(f"--udp cannot go with {flag} (it needs TCP)")
    timeout = DEFAULT_UDP_TIMEOUT if options.timeout is None else options.timeout
    retries = DEFAULT_RETRIES if options.retries is None else options.retries
    try:
        client = UdpClient(options.host, options.port, timeout=timeout, retries=retries)
    except OSError as exc:
        _say(f"error: cannot reach {where}: {_reason(exc)}")
        return 1
    with client:
        # A lost datagram does not put later ones out of step: go on (on a new socket).
        session = _Session(client, f"{where} (UDP)", survive=True, failure=1)
        try:
            return _messages_main(session, options, interactive)
        except KeyboardInterrupt:
            if interactive:
                print()
            return INTERRUPTED


def _tls_context(parser: argparse.ArgumentParser,
                 options: argparse.Namespace) -> ssl.SSLContext | None:
    """The client's TLS context from ``--tls`` and its files (None: no TLS)."""
    if not options.tls:
        if options.tls_ca or options.tls_cert or options.tls_key:
            parser.error("--tls-ca, --tls-cert and --tls-key go with --tls")
        return None
    if options.tls_key and not options.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    try:
        context = ssl.create_default_context(cafile=options.tls_ca)
        if options.tls_cert:
            context.load_cert_chain(options.tls_cert, options.tls_key)
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        parser.error(f"--tls-ca/--tls-cert/--tls-key: cannot load: {reason}")
    return context


def _token(parser: argparse.ArgumentParser, path: str | None) -> bytes | None:
    """The token from ``--token-file`` (its first token line), else ``MUXSRV_TOKEN``."""
    if path is None:
        env = os.environb.get(b"MUXSRV_TOKEN")
        return (env.strip() or None) if env is not None else None
    try:
        with open(path, "rb") as file:
            lines = file.read().split(b"\n")
    except OSError as exc:
        parser.error(f"--token-file {path}: {exc.strerror or exc}")
    for line in lines:
        token = line.strip()
        if token and not token.startswith(b"#"):
            return token
    parser.error(f"--token-file {path}: no token in the file")


def _messages_main(session: _Session, options: argparse.Namespace, interactive: bool) -> int:
    """Each MESSAGE, or line, one request: 1 if any was not answered."""
    write = _reply_writer(options.show)
    if options.messages:
        source: Iterable[bytes] = [m.encode("utf-8", "surrogateescape") for m in options.messages]
    else:
        source = _nonblank(_lines(interactive, "> "), options.empty_lines)
    status = 0
    for payload in source:
        if session.run(partial(_request, write, payload)):
            status = 1
        if session.over:
            break
    return status


def _request(write: Callable[[bytes], None], payload: bytes, client: Client) -> int:
    write(client.request(payload))
    return 0


def _nonblank(lines: Iterator[bytes], keep_blank: bool) -> Iterator[bytes]:
    return lines if keep_blank else (line for line in lines if line.strip())


# -- --exec: like `ssh host COMMAND` ------------------------------------------


def _exec_main(
    session: _Session, options: argparse.Namespace, command: str, interactive: bool
) -> int:
    """The command's status; at a prompt or from stdin, the last command's."""
    if command:
        return session.run(partial(_exec_run, command.encode("utf-8", "surrogateescape")))
    status = 0
    for line in _nonblank(_lines(interactive, "$ "), options.empty_lines):
        status = session.run(partial(_exec_run, line))
        if session.over:
            break
    return status


def _exec_run(command: bytes, client: Client) -> int:
    """Run one command: its stdout to ours, its stderr to ours; return its status."""
    result = client.exec(command)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    if result.timed_out:
        sys.stderr.buffer.write(b"muxsrv-client: timed out (the server's --exec-timeout)\n")
    if result.truncated:
        sys.stderr.buffer.write(b"muxsrv-client: output truncated (--exec-max-output)\n")
    sys.stderr.flush()
    return result.status


if __name__ == "__main__":
    raise SystemExit(main())
