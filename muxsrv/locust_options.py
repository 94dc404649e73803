"""Where a MuxUser connects and how: the address, TLS, the token; the kit's options.

A :class:`Target` is everything a connection needs besides its framing: the
address, an SSL context for ``tls://`` hosts (the server's certificate and
host name are verified: with the CA of ``--mux-tls-ca``, else the system's),
and the token it authenticates with (``AUTH <token>`` as its first message).

Importing ``muxsrv.locust`` adds the kit's options to Locust's command line
(and environment, ``LOCUST_MUX_TOKEN_FILE``...):

    --mux-token-file FILE   authenticate with the first token in FILE, read as the
                            server reads its --auth-token-file (muxsrv.auth)
    --mux-tls-ca FILE       the CA (PEM) that signed the server's certificate
    --mux-admin HOST:PORT   the server's admin listener: its latency beside Locust's
                            at the end of the run (``locust_report``)

They are read once per process and checked as Locust starts (``check_options``):
an unreadable or empty token file, a CA file that does not load, or
``--mux-tls-ca`` with a ``tcp://`` host ends the run with one line and exit
status 2 before any user starts, as muxsrv refuses its own options.  The
token never appears in a log line, an error, a repr or the web UI.
"""

from __future__ import annotations

import logging
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any

from locust import events
from locust.env import Environment

from .auth import TokenFileError, read_tokens
from .client_stat import parse_admin
from .wire import parse_target

__all__ = ["OptionError", "Target", "add_options", "check_options", "target"]

log = logging.getLogger("muxsrv.locust")


class OptionError(ValueError):
    """A kit option or a host that cannot be used; the message says why (no secret in it)."""


@dataclass(frozen=True)
class Target:
    """Where a MuxClient connects: ``address``; ``tls`` (a context) for tls://; ``token``;
    ``udp`` for udp:// (a UdpMuxClient: datagrams, no TLS, no token)."""

    address: tuple[str, int]
    tls: ssl.SSLContext | None = None
    token: bytes | None = field(default=None, repr=False)  # never shown
    udp: bool = False

    @property
    def server_hostname(self) -> str:
        """The name the server's certificate must carry: the host as --host gave it."""
        return self.address[0]


# Read once per process: thousands of users share one token and one context.
_tokens: dict[str, bytes] = {}
_contexts: dict[str | None, ssl.SSLContext] = {}


def token_from(path: str) -> bytes:
    """The first token in ``path`` (OptionError if the file is unusable)."""
    if path not in _tokens:
        try:
            _tokens[path] = read_tokens(path, "--mux-token-file")[0]
        except TokenFileError as exc:
            raise OptionError(str(exc)) from None
    return _tokens[path]


def tls_context(ca: str | None) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name."""
    if ca not in _contexts:
        try:
            from gevent import ssl as gevent_ssl  # cooperative even if not monkey-patched

            context = gevent_ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise OptionError(f"--mux-tls-ca {ca}: cannot load the CA: {reason}") from None
        _contexts[ca] = context
    return _contexts[ca]


def target(host: str, token_file: str | None = None, tls_ca: str | None = None) -> Target:
    """The Target for ``host`` (tcp://, tls:// or udp://); OptionError says what is wrong."""
    try:
        scheme, name, port = parse_target(host)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if tls_ca is not None and scheme != "tls":
        raise OptionError(f"--mux-tls-ca is for tls:// hosts, not {host!r}")
    if scheme == "udp":
        if token_file is not None:
            raise OptionError(f"--mux-token-file needs TCP: a udp:// host has no "
                              f"authentication ({host!r})")
        return Target((name, port), udp=True)
    context = tls_context(tls_ca) if scheme == "tls" else None
    token = token_from(token_file) if token_file is not None else None
    return Target((name, port), context, token)


def option(environment: Environment, name: str, default: Any) -> Any:
    """A kit option's value: the command line's, else ``default`` (the user class's)."""
    value = getattr(environment.parsed_options, name, None)
    return default if value is None else value


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def add_options(parser: Any) -> None:
    parser.add_argument(
        "--mux-token-file",
        metavar="FILE",
        default=None,
        include_in_web_ui=False,
        help="Authenticate every connection with AUTH <token>, the first token in FILE "
        "(a server with --auth-token-file). The token is never logged.",
    )
    parser.add_argument(
        "--mux-tls-ca",
        metavar="FILE",
        default=None,
        include_in_web_ui=False,
        help="With --host tls://HOST:PORT: the CA (PEM) that signed the server's certificate "
        "(default: the system's CAs). The certificate and host name are always verified.",
    )
    parser.add_argument(
        "--mux-admin",
        metavar="HOST:PORT",
        type=parse_admin,  # a mistake: one line from Locust's parser, exit status 2
        default=None,
        include_in_web_ui=False,
        help="The server's admin listener (its --admin-port): at the end of the run, print "
        "the server's latency percentiles beside Locust's, and with --csv write them to "
        "PREFIX_server.csv.",
    )


@events.init.add_listener  # type: ignore[untyped-decorator]
def check_options(environment: Environment, **_: Any) -> None:
    """Refuse unusable kit options before any user starts: one line, exit status 2."""
    options = environment.parsed_options
    token_file = getattr(options, "mux_token_file", None)
    tls_ca = getattr(options, "mux_tls_ca", None)
    try:
        if token_file is not None:
            token_from(token_file)
        if tls_ca is not None:
            tls_context(tls_ca)
            if environment.host and parse_target(environment.host)[0] != "tls":
                raise OptionError(f"--mux-tls-ca is for tls:// hosts, not {environment.host!r}")
    except OptionError as exc:
        log.error("%s", exc)
        sys.exit(2)
    except ValueError:
        pass  # a malformed --host: each user says so (and the locustfile may check it)
