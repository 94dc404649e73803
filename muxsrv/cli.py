"""The command line: ``python -m muxsrv [options]`` (also the ``muxsrv`` script).

Parsing runs in two steps so that a handler can declare its own options:
first ``--handler`` alone is read and the plugin found and loaded, then the
full parser, with the plugin's options added, reads everything.  Neither
takes abbreviations: ``--h`` is not ``--handler``, and a handler's options
added later cannot change what a short prefix meant.  Every mistake a user
can make (bad value, unknown or ambiguous handler, broken plugin, a plugin
option that clashes with a core one, a ``configure`` that refuses or fails,
a host name that does not resolve, a port already in use) ends with one
line on stderr and exit status 2; any other failure to listen, with one line
and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import plugins
from .address import format_address
from .auth import Gate, TokenFileError, Tokens
from .framing import FRAMINGS
from .handler import ConfigError, HandlerFactory, HandlerFunction
from .handlers.exec_config import is_loopback
from .loop import EventLoop
from .options import max_frame, parse_size, positive_int, program_version, seconds, whole_number
from .pidfile import PidFile, PidFileError
from .proxying import DEFAULT_PROXY_FROM, Network, Proxying, parse_networks
from .server import CannotListen, Server, Settings
from .supervisor import supervise
from .tls import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_HANDSHAKES,
    TLSConfigError,
    TLSServer,
    load_context,
)
from .tuning import keep_large_buffers_mapped, raise_open_files_limit

__all__ = ["main", "parse_size", "positive_int", "seconds", "whole_number"]

log = logging.getLogger("muxsrv")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_port = whole_number(0, 65535, "must be from 0 to 65535 (0: any free port)", "a port number")
_workers = whole_number(0, None, "must be 0 (one per CPU) or more")


def _host(text: str) -> str:
    # getaddrinfo finds nothing for "", so it would fail as "cannot listen on :9999";
    # socket.bind would take it as every IPv4 address.  Say which is meant instead.
    if not text:
        raise argparse.ArgumentTypeError(
            "empty; for every address give 0.0.0.0 (IPv4) or :: (IPv6)"
        )
    return text


def _networks(text: str) -> tuple[Network, ...]:
    try:
        return parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(handler: plugins.LoadedPlugin | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="muxsrv",
        description="A single-threaded multiplexing TCP server with handler plugins.",
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--host", type=_host, default="127.0.0.1",
        help="address or name to listen on (default: 127.0.0.1; 0.0.0.0: every IPv4 address)")
    add("--port", type=_port, default=9999, help="port (default: 9999; 0: any free port)")
    add("--handler", default="echo",
        help="built-in (echo, upper, exec), entry-point name, or package.module:attribute "
             "(default: echo)")
    add("--framing", choices=FRAMINGS, default="length",
        help="length: 4-byte big-endian length prefix (default); line: newline-terminated; "
             "raw: every recv is a message")
    add("--max-frame", type=max_frame, default=16 << 20, metavar="BYTES",
        help="largest message (and line) accepted (default: 16M; at most 2^31-1)")
    add("--max-conns", type=positive_int, default=10000, metavar="N",
        help="connections served at once; more get an error frame and are closed "
             "(default: 10000)")
    add("--idle-timeout", type=seconds, default=300.0, metavar="SECONDS",
        help="close connections idle this long (default: 300; 0: never)")
    add("--drain-timeout", type=seconds, default=5.0, metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long to deliver owed replies (default: 5)")
    add("--auth-token-file", metavar="FILE",
        help="require each connection's first message to be AUTH <token>, a token from FILE "
             "(one per line, at least 16 bytes; # comments); SIGHUP re-reads it")
    add("--auth-timeout", type=seconds, default=10.0, metavar="SECONDS",
        help="close a connection not authenticated this long after it connected "
             "(default: 10; 0: never)")
    add("--tls-cert", metavar="FILE",
        help="serve TLS (1.2 or 1.3) with this PEM certificate chain (the key may be in it "
             "too); SIGHUP re-reads the TLS files")
    add("--tls-key", metavar="FILE", help="the certificate's PEM private key, if not in --tls-cert")
    add("--tls-client-ca", metavar="FILE",
        help="mutual TLS: require client certificates signed by a CA in this PEM file "
             "(counts as authentication)")
    add("--tls-handshake-timeout", type=seconds, default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection whose TLS handshake is not done this long after it connected "
             "(default: 10; 0: never)")
    add("--tls-max-handshakes", type=positive_int, default=DEFAULT_MAX_HANDSHAKES, metavar="N",
        help="TLS handshakes in flight at once; beyond, new connections wait unread "
             "(default: 1000)")
    add("--no-protected-mode", dest="protected_mode", action="store_false",
        help="serve non-loopback clients on a non-loopback --host without authentication")
    add("--proxy-protocol", action="store_true",
        help="every connection starts with a PROXY protocol header (v1 or v2, within 5 s) "
             "naming the real client, as a load balancer sends with send-proxy(-v2)")
    add("--proxy-from", type=_networks, default=DEFAULT_PROXY_FROM, metavar="CIDR[,CIDR...]",
        help="with --proxy-protocol, who may send the header; connections from anywhere "
             "else are closed (default: loopback only, 127.0.0.0/8,::1/128)")
    add("--pid-file", metavar="FILE",
        help="write the server's PID (with --workers: the parent's) to FILE once listening; "
             "removed on exit")
    add("--workers", type=_workers, default=1, metavar="N",
        help="run N server processes sharing the port with SO_REUSEPORT, under a parent that "
             "restarts them (default: 1, no parent; 0: one per CPU)")
    add("--log-level", default="info", type=str.lower,
        choices=("debug", "info", "warning", "error"), help="(default: info)")
    add("--version", action="version", version=program_version("muxsrv"))
    if handler is not None and handler.form == "class":
        try:
            handler.handler_class.add_arguments(parser)
        except Exception as exc:  # a clash with a core option is an argparse.ArgumentError
            _fail(f"{plugins.culprit(handler.plugin)}: add_arguments() failed: {_said(exc)}")
    return parser


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"muxsrv: error: {message}\n")
    raise SystemExit(2)


def load_handler(name: str) -> plugins.LoadedPlugin:
    try:
        return plugins.load(plugins.find(name))
    except plugins.PluginError as exc:
        _fail(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    pre = _Parser(prog="muxsrv", add_help=False, allow_abbrev=False)
    pre.add_argument("--handler", default="echo")
    known, _rest = pre.parse_known_args(args)
    loaded = load_handler(known.handler)
    options = build_parser(loaded).parse_args(args)

    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s muxsrv %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    tls = tls_from(options)
    gate = gate_from(options)
    proxying = Proxying(options.proxy_from) if options.proxy_protocol else None
    function: HandlerFunction | None = None
    factory: HandlerFactory | None = None
    if loaded.form == "function":
        function = loaded.obj  # type: ignore[assignment]
    else:
        try:
            factory = loaded.handler_class.configure(options)
        except ConfigError as exc:
            _fail(str(exc))
        except Exception as exc:
            _fail(f"{plugins.culprit(loaded.plugin)}: configure() raised {_said(exc)}")
    settings = settings_from(options, loaded.describe)
    if options.workers != 1 and not hasattr(signal, "sigtimedwait"):
        _fail(f"--workers needs signal.sigtimedwait, which {sys.platform} lacks")
    pid_file = PidFile(options.pid_file)
    try:
        if options.workers == 1:
            return serve(settings, function=function, factory=factory, gate=gate, tls=tls,
                         proxying=proxying, pid_file=pid_file)
        count = options.workers or os.cpu_count() or 1
        tokens = gate.tokens if gate is not None else None
        stamped = _stamps(tokens, tls)

        def worker(worker_settings: Settings) -> int:
            # Forked from the parent, which read the files once, at start: a worker
            # started after a SIGHUP (a restart) must not serve what that replaced.
            if _stamps(tokens, tls) != stamped:
                _reload(tokens, tls)
            return serve(worker_settings, function=function, factory=factory, gate=gate,
                         tls=tls, proxying=proxying)

        return supervise(settings, count, worker, on_reserved=pid_file.write)
    except CannotListen as exc:
        sys.stderr.write(f"muxsrv: error: {exc}\n")
        return 2 if exc.mistake else 1
    except PidFileError as exc:
        sys.stderr.write(f"muxsrv: error: {exc}\n")
        return 1
    finally:
        pid_file.remove()


def settings_from(options: argparse.Namespace, handler_name: str) -> Settings:
    """The server's settings from parsed options."""
    return Settings(
        host=options.host,
        port=options.port,
        framing=options.framing,
        max_frame=options.max_frame,
        max_conns=options.max_conns,
        idle_timeout=options.idle_timeout,
        drain_timeout=options.drain_timeout,
        handler_name=handler_name,
    )


def tls_from(options: argparse.Namespace) -> TLSServer | None:
    """TLS from the options (exit 2, one line, if a file cannot be used)."""
    if options.tls_cert is None:
        for flag in ("tls_key", "tls_client_ca"):
            if getattr(options, flag) is not None:
                _fail(f"--{flag.replace('_', '-')} needs --tls-cert FILE")
        return None
    try:
        context = load_context(options.tls_cert, options.tls_key, options.tls_client_ca)
    except TLSConfigError as exc:
        _fail(str(exc))
    return TLSServer(context, options.tls_handshake_timeout, options.tls_max_handshakes,
                     mutual=options.tls_client_ca is not None,
                     files=(options.tls_cert, options.tls_key, options.tls_client_ca))


def gate_from(options: argparse.Namespace) -> Gate | None:
    """Token authentication and protected mode from the options (exit 2 if wrong)."""
    tokens = None
    if options.auth_token_file is not None:
        if options.framing == "raw":
            _fail("--auth-token-file needs message boundaries: give --framing length or line, "
                  "not raw")
        try:
            tokens = Tokens(options.auth_token_file)
        except TokenFileError as exc:
            _fail(str(exc))
    authenticated = tokens is not None or getattr(options, "tls_client_ca", None) is not None
    protected = not authenticated and options.protected_mode and not is_loopback(options.host)
    if tokens is None and not protected:
        return None
    return Gate(options.framing, tokens, options.auth_timeout, protected)


def _stamps(tokens: Tokens | None, tls: TLSServer | None) -> list[tuple[int, int] | None]:
    """When each token and TLS file last changed, and its size (None: unreadable)."""
    paths = ([tokens.path] if tokens is not None else []) + [
        path for path in (tls.files if tls is not None and tls.files else ()) if path]
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((info.st_mtime_ns, info.st_size))
    return stamps


def _reload(tokens: Tokens | None, tls: TLSServer | None) -> None:
    """SIGHUP: re-read the token file and the TLS files (each keeps its old self if bad)."""
    if tokens is not None:
        tokens.reload()
    if tls is not None:
        tls.reload()


def serve(
    settings: Settings,
    *,
    function: HandlerFunction | None = None,
    factory: HandlerFactory | None = None,
    gate: Gate | None = None,
    tls: TLSServer | None = None,
    proxying: Proxying | None = None,
    pid_file: PidFile | None = None,
) -> int:
    """Listen and serve until a signal has drained; the exit status.

    Raises CannotListen.  As a worker (``reuse_port``), only the first SIGINT or
    SIGTERM counts: a Ctrl-C reaches the whole process group and the parent
    forwards it as well; the parent deals with a second one.
    """
    soft, _hard = raise_open_files_limit()
    tuned = keep_large_buffers_mapped()
    loop = EventLoop()
    try:
        server = Server(loop, settings, function=function, factory=factory, gate=gate, tls=tls,
                        proxying=proxying)

        def stop() -> None:
            if not (settings.reuse_port and server.draining):
                server.shutdown()

        # Before listening, so that no signal finds a listener without its handler.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop)
        tokens = gate.tokens if gate is not None else None
        if tokens is not None or tls is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: _reload(tokens, tls))
        where = ", ".join(format_address(address) for address in server.listen())
        if pid_file is not None:
            pid_file.write()
        worker = f", worker pid {os.getpid()}" if settings.reuse_port else ""
        if tls is not None:
            worker += ", TLS with client certificates" if tls.mutual else ", TLS"
        if tokens is not None:
            worker += ", token authentication"
        elif gate is not None and gate.protected:
            worker += ", protected mode on: loopback clients only"
        if proxying is not None:
            worker += ", PROXY protocol from " + ",".join(map(str, proxying.trusted))
        sys.stderr.write(
            f"muxsrv: listening on {where} "
            f"(handler {settings.handler_name}, framing {settings.framing}{worker})\n"
        )
        sys.stderr.flush()
        log.debug("open files limit: %d; allocator thresholds raised: %s", soft, tuned)
        server.run()
    finally:
        loop.close()
    log.info("stopped")
    return server.exit_status
