"""MuxUser: a Locust user that speaks muxsrv's wire protocol over one connection (TCP or TLS),
or over UDP datagrams.

Install with ``pip install 'muxsrv[loadtest]'``.  Each user owns a `MuxClient`
(``muxsrv.locust_client``): one gevent socket (cooperative whether or not the
process is monkey-patched), opened on first use, in the user's ``framing``
(``length``, ``line`` or ``raw``); over TLS for ``--host tls://HOST:PORT``
(certificate and host name verified, ``--mux-tls-ca FILE``), authenticated
with ``--mux-token-file FILE`` (see ``muxsrv.locust_options``).  A request is
a message out and its replies back; each message is timed from the moment
its batch was sent and reported through Locust's request event, so it lands
in the console table, the web UI, ``--csv`` and ``--html`` like any HTTP
request would.  A refused AUTH or TLS handshake fails the requests like a
failed connect.

How many replies a message gets is the request's to say: one by default;
``replies=N`` (N >= 0) for a handler that sends none or several, or
``replies=done``, a function that sees the replies so far and says whether
they are all.  With ``replies=`` the check sees the whole list.  With ``raw``
framing there are no boundaries: a reply is ``reply_size`` bytes (by default
as many as were sent), and a ``done`` function sees the chunks as they come.

A request fails, with the reason as its exception, when its check rejects the
reply (raised, or returned False), when the server answered with an error
frame (`ServerError`), or when the connection could not be made, broke, or
stayed silent past the timeout; the last kind fails every request in flight
on it, and the next request reconnects (after a short, growing pause if
connecting failed).  Not a failure: the goodbye of a draining server
(``length`` framing): the client reconnects and resends the requests still in
flight, in order.  With ``--host udp://HOST:PORT`` (a server with ``--udp``) the user's client is a
`UdpMuxClient` (``muxsrv.locust_udp``): one datagram per message, one in
flight, and a reply not back within the ``timeout`` (``--mux-timeout`` in
loadtest/locustfile.py) fails its request as a lost datagram (`LostDatagram`).
A locustfile is a few lines: see README.md, "Load-testing
your own handler", and loadtest/examples/.
"""

from __future__ import annotations

try:
    from locust import User, constant
    from locust.env import Environment
    from locust.exception import LocustError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"muxsrv.locust needs Locust ({exc.name or exc} is missing): "
        "pip install 'muxsrv[loadtest]'"
    ) from exc

from . import locust_report  # noqa: F401  (its listeners: the end-of-run report)
from .locust_client import (
    CONNECT_BACKOFF,
    INLINE_SEND_LIMIT,
    RECONNECT_ATTEMPTS,
    RECV_SIZE,
    AuthenticationFailed,
    MuxClient,
    resolve,
)
from .locust_options import OptionError, Target, option, target
from .locust_udp import LostDatagram, UdpMuxClient
from .wire import (
    Check,
    Done,
    RepliesCheck,
    ServerError,
    WrongReply,
    parse_host,
    parse_target,
)

__all__ = [
    "CONNECT_BACKOFF",
    "INLINE_SEND_LIMIT",
    "RECONNECT_ATTEMPTS",
    "RECV_SIZE",
    "AuthenticationFailed",
    "Check",
    "Done",
    "LostDatagram",
    "MuxClient",
    "MuxUser",
    "OptionError",
    "RepliesCheck",
    "ServerError",
    "Target",
    "UdpMuxClient",
    "WrongReply",
    "parse_host",
    "parse_target",
    "raise_open_file_limit",
    "resolve",
]


class MuxUser(User):
    """A Locust user with a `MuxClient` as ``self.client``; subclass it and add tasks.

    Class attributes to set: ``host`` (or pass --host tcp://HOST:PORT, or
    tls://HOST:PORT), ``handler`` (shown as the request type), ``framing`` (the
    server's --framing), ``timeout`` (seconds per request or batch),
    ``token_file`` and ``tls_ca`` (unless --mux-token-file and --mux-tls-ca give
    them).  Users send back to back unless the subclass sets a ``wait_time``.
    """

    abstract = True
    wait_time = constant(0)
    handler = "mux"
    framing = "length"
    timeout = 30.0
    token_file: str | None = None
    tls_ca: str | None = None
    client: MuxClient | UdpMuxClient

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError(f"{type(self).__name__} needs --host tcp://HOST:PORT")
        try:
            where: Target = target(
                self.host,
                option(environment, "mux_token_file", self.token_file),
                option(environment, "mux_tls_ca", self.tls_ca),
            )
        except OptionError as exc:
            raise LocustError(str(exc)) from None
        if where.udp:
            self.client = UdpMuxClient(environment, where.address, request_type=self.handler,
                                       timeout=self.timeout, context=self.context)
            return
        self.client = MuxClient(
            environment,
            where.address,
            request_type=self.handler,
            timeout=self.timeout,
            framing=self.framing,
            context=self.context,
            tls=where.tls,
            token=where.token,
        )

    def on_stop(self) -> None:
        self.client.close()


def raise_open_file_limit() -> int | None:
    """Raise this process's soft open-files limit to its hard limit; return the soft limit.

    Every simulated user holds one socket, so a Locust process needs a little
    more than one descriptor per user it runs.  None where there is no such limit.
    """
    try:
        from .tuning import raise_open_files_limit  # resource: not on Windows

        return raise_open_files_limit()[0]
    except (ImportError, OSError, ValueError):
        return None
