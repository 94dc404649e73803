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

from . import logs, plugins, udp_options
from .address import format_address
from .auth import Gate, TokenFileError, Tokens
from .framing import FRAMINGS
from .handler import ConfigError, HandlerFactory, HandlerFunction
from .handlers.exec_config import is_loopback
from .handover import Handover, inherited
from .limits import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_SOFT_SECONDS,
)
from .loop import EventLoop
from .options import (
    max_frame,
    options_in_force,
    parse_size,
    positive_int,
    program_version,
    seconds,
    size_or_zero,
    whole_number,
)
from .pidfile import PidFile, PidFileError
from .proxying import DEFAULT_PROXY_FROM, Network, Proxying, parse_networks
from .server import CannotListen, Server, Settings
from .supervisor import CannotStart, supervise
from .tls import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_HANDSHAKES,
    TLSConfigError,
    TLSServer,
    load_context,
)
from .tuning import keep_large_buffers_mapped, raise_open_files_limit
from .workerstats import WorkerAdmin, admin_listener, take_from_env

__all__ = ["main", "parse_size", "positive_int", "seconds", "whole_number"]

log = logging.getLogger("muxsrv")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_port = whole_number(0, 65535, "must be from 0 to 65535 (0: any free port)", "a port number")
_workers = whole_number(0, None, "must be 0 (one per CPU) or more")
_per_ip = whole_number(0, None, "must be 0 (no limit) or more")


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
    add("--max-conns-per-ip", type=_per_ip, default=0, metavar="N",
        help="connections at once from one client address (with --proxy-protocol, the "
             "header's); more get an error frame and are closed (default: 0, no limit)")
    add("--idle-timeout", type=seconds, default=300.0, metavar="SECONDS",
        help="close connections (and drop UDP peers' instances) idle this long "
             "(default: 300; 0: never)")
    udp_options.add_arguments(parser)
    add("--frame-timeout", type=seconds, default=DEFAULT_FRAME_TIMEOUT, metavar="SECONDS",
        help="a message must be complete this long after its first byte, else the "
             "connection is closed (default: 30; 0: never; not with --framing raw)")
    add("--max-buffered", type=size_or_zero, default=DEFAULT_MAX_BUFFERED, metavar="BYTES",
        help="bytes held for large unfinished messages across all connections; beyond, the "
             "largest holders are stalled, then closed (default: 256M; 0: no limit)")
    add("--max-output", type=size_or_zero, default=DEFAULT_MAX_OUTPUT, metavar="BYTES",
        help="a connection with more output queued than this (a client not reading what a "
             "handler pushes) is dropped (default: 64M; 0: no limit)")
    add("--output-soft-limit", type=size_or_zero, default=0, metavar="BYTES",
        help="a connection with more output queued than this for --output-soft-seconds "
             "is dropped (default: 0, off)")
    add("--output-soft-seconds", type=seconds, default=DEFAULT_SOFT_SECONDS, metavar="SECONDS",
        help="how long a connection may stay over --output-soft-limit (default: 60)")
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
    add("--admin-port", type=_port, default=None, metavar="PORT",
        help="serve /metrics, /stats, /clients and /healthz over HTTP on this port "
             "(default: off; 9998 is the port the docs suggest)")
    add("--admin-host", type=_host, default="127.0.0.1",
        help="address of the admin port (default: 127.0.0.1); with --auth-token-file it "
             "asks for Authorization: Bearer <token>")
    add("--pid-file", metavar="FILE",
        help="write the server's PID (with --workers: the parent's) to FILE once listening; "
             "removed on exit")
    add("--workers", type=_workers, default=1, metavar="N",
        help="run N server processes sharing the listening sockets, under a parent that "
             "restarts them and, on SIGHUP, replaces them with fresh ones "
             "(default: 1, no parent; 0: one per CPU)")
    logs.add_options(parser)
    add("--version", action="version", version=program_version("muxsrv"))
    if handler is not None and handler.form == "class":
        try:
            handler.handler_class.add_arguments(parser)
        except Exception as exc:  # a clash with a core option is an argparse.ArgumentError
            _fail(f"{plugins.culprit(handler.plugin)}: add_arguments() failed: {_said(exc)}")
    return parser


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Failed(SystemExit):
    """Cannot start: one line, exit status 2 (``main`` says where the line goes)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def _fail(message: str) -> NoReturn:
    raise _Failed(message)


def load_handler(name: str) -> plugins.LoadedPlugin:
    try:
        return plugins.load(plugins.find(name))
    except plugins.PluginError as exc:
        _fail(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        handed = inherited()  # first: nothing this process starts may see the variables
    except ValueError as exc:
        sys.stderr.write(f"muxsrv: error: not a worker: {exc}\n")
        raise SystemExit(2) from None
    try:
        return _main(args, handed)
    except _Failed as exc:  # a worker tells its supervisor, which logs it in its own line
        if not handed.report_failure(exc.message):
            sys.stderr.write(f"muxsrv: error: {exc.message}\n")
        raise SystemExit(2) from None


def _main(args: list[str], handed: Handover) -> int:
    worker = handed if handed.socks is not None else None
    shared_admin = take_from_env(worker is not None)
    pre = _Parser(prog="muxsrv", add_help=False, allow_abbrev=False)
    pre.add_argument("--handler", default="echo")
    known, _rest = pre.parse_known_args(args)
    loaded = load_handler(known.handler)
    options = build_parser(loaded).parse_args(args)
    if options.max_output and options.output_soft_limit >= options.max_output:
        _fail("--output-soft-limit must be below --max-output (or --max-output 0)")
    refused = udp_options.refusal(options, known.handler, loaded.obj)
    if refused is not None:
        _fail(refused)

    try:
        log_file = logs.from_options(options, worker=worker is not None,
                                     supervisor=worker is None and options.workers != 1)
    except OSError as exc:
        _fail(f"cannot open --log-file {options.log_file}: {exc.strerror or exc}")
    if handed.ignored:
        log.debug("not a --workers worker: %s; listening on a port of its own", handed.ignored)
    tls = tls_from(options)
    gate = gate_from(options)
    if (options.admin_port is not None and worker is None and not is_loopback(options.admin_host)
            and (gate is None or gate.tokens is None)):
        log.warning("the admin port listens on %s without --auth-token-file: whoever reaches "
                    "it sees every client's address and the options", options.admin_host)
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
    pid_file = PidFile(options.pid_file if worker is None else None)  # the supervisor's
    try:
        if worker is not None or options.workers == 1:
            return serve(settings, function=function, factory=factory, gate=gate, tls=tls,
                         proxying=proxying, pid_file=pid_file, worker=worker,
                         admin=(options.admin_host, options.admin_port), options=options,
                         shared_admin=shared_admin)
        count = options.workers or os.cpu_count() or 1
        admin = ((options.admin_host, options.admin_port) if options.admin_port is not None
                 else None)
        return supervise(settings, count, args, on_listening=pid_file.write,
                         log_file=log_file is not None, admin=admin)
    except CannotListen as exc:
        sys.stderr.write(f"muxsrv: error: {exc}\n")
        return 2 if exc.mistake else 1
    except CannotStart as exc:
        sys.stderr.write(f"muxsrv: error: {exc}\n")
        return 1
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
        frame_timeout=options.frame_timeout,
        max_conns_per_ip=options.max_conns_per_ip,
        max_output=options.max_output,
        max_buffered=options.max_buffered,
        output_soft_limit=options.output_soft_limit,
        output_soft_seconds=options.output_soft_seconds,
        handler_name=handler_name,
        udp=udp_options.mode(options),
        udp_max_peers=options.udp_max_peers,
        udp_max_queue=options.udp_max_queue,
        udp_allow_low_ports=options.udp_allow_low_ports,
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



def _reload(tokens: Tokens | None, tls: TLSServer | None) -> None:
    """SIGHUP in a single process: re-read the TLS files and the token file (each keeps
    its old self if bad, after an error line of its own); one line says what was done."""
    done = []
    if tls is not None:
        files = ["--tls-cert"] + [f"--{name}" for name, path in
                                  (("tls-key", tls.files and tls.files[1]),
                                   ("tls-client-ca", tls.files and tls.files[2])) if path]
        done.append(f"re-read {', '.join(files)}" if tls.reload()
                    else "kept the TLS files loaded before")
    if tokens is not None:
        done.append(f"re-read --auth-token-file: {tokens.count} tokens" if tokens.reload()
                    else f"kept the {tokens.count} tokens loaded before")
    done.append(logs.reopen())
    done.append("the handler code is not reloaded (it is with --workers)")
    log.info("SIGHUP: %s", "; ".join(done))


def serve(
    settings: Settings,
    *,
    function: HandlerFunction | None = None,
    factory: HandlerFactory | None = None,
    gate: Gate | None = None,
    tls: TLSServer | None = None,
    proxying: Proxying | None = None,
    pid_file: PidFile | None = None,
    worker: Handover | None = None,
    admin: tuple[str, int | None] = ("127.0.0.1", None),
    options: argparse.Namespace | None = None,
    shared_admin: WorkerAdmin | None = None,
) -> int:
    """Listen and serve until a signal has drained; the exit status.

    Raises CannotListen.  As a ``--workers`` worker (``worker``: the inherited
    listening sockets and readiness pipe), only the first SIGINT or SIGTERM
    counts: a Ctrl-C reaches the whole process group and the supervisor
    forwards it as well; the supervisor deals with a second one.  On SIGHUP a
    worker only reopens its ``--log-file`` (the supervisor reloads by starting
    new workers, and forwards the SIGHUP to those serving when there is a log
    file); one that comes after the loop has closed is ignored, not fatal.
    """
    if worker is not None:  # restored when the loop closes: a late SIGHUP must not kill
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    soft, _hard = raise_open_files_limit()
    tuned = keep_large_buffers_mapped()
    loop = EventLoop()
    try:
        server = Server(loop, settings, function=function, factory=factory, gate=gate, tls=tls,
                        proxying=proxying)

        def stop() -> None:
            if not (worker is not None and server.draining):
                server.shutdown()

        # Before listening, so that no signal finds a listener without its handler.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop)
        tokens = gate.tokens if gate is not None else None
        if worker is None:
            loop.add_signal_handler(signal.SIGHUP, lambda: _reload(tokens, tls))
        else:
            loop.add_signal_handler(signal.SIGHUP, logs.worker_sighup)
        listening = server.listen(worker.socks if worker is not None else None)
        where = ", ".join(format_address(address) for address in listening)
        if options is not None:
            server.stats.options = options_in_force(options)
        admin_server = admin_listener(loop, server, admin,
                                      gate.tokens if gate is not None else None, shared_admin)
        if admin_server is not None and admin_server.sock is not None:
            admin_where = admin_server.sock.getsockname()
        if pid_file is not None:
            pid_file.write()
        if worker is not None and worker.ready_fd >= 0:
            loop.call_soon(worker.report_ready)
        details = f", worker pid {os.getpid()}" if worker is not None else ""
        if tls is not None:
            details += ", TLS with client certificates" if tls.mutual else ", TLS"
        if tokens is not None:
            details += ", token authentication"
        elif gate is not None and gate.protected:
            details += ", protected mode on: loopback clients only"
        if proxying is not None:
            details += ", PROXY protocol from " + ",".join(map(str, proxying.trusted))
        if admin_server is not None:  # (before the worker's pid: a line's end names it)
            details = f", admin on {format_address(admin_where)}{details}"
        framing = f"framing {settings.framing}"
        if server.udp is not None:
            framing = ("UDP only, framing does not apply: one datagram is one message"
                       if settings.udp == "only" else
                       f"{framing}; also UDP on "
                       f"{', '.join(format_address(a) for a in server.udp.addresses)}, "
                       "where framing does not apply: one datagram is one message")
        started = (f"listening on {where} "
                   f"(handler {settings.handler_name}, {framing}{details})")
        sys.stderr.write(f"muxsrv: {started}\n")  # the line tools parse: never reformatted
        sys.stderr.flush()
        if logs.has_file():  # and the file says it too
            log.info("%s", started)
        log.debug("open files limit: %d; allocator thresholds raised: %s", soft, tuned)
        server.run()
        if admin_server is not None and admin_server.publisher is not None:
            admin_server.publisher.publish(again=False)  # the last counters, for the others
    finally:
        loop.close()
    log.info("stopped")
    return server.exit_status

