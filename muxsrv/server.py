"""The server: listening sockets, accepting, limits, idle timeouts, shutdown.

Accepting runs until ``EAGAIN``, at most ``ACCEPT_BATCH`` connections per
wake-up so a connection storm cannot starve established clients.  When the
process runs out of descriptors (``EMFILE``/``ENFILE``), the listener is
taken out of the selector for a moment (a level-triggered listener with a
pending connection would otherwise wake the loop forever at 100% CPU), the
episode is logged once, and the connections already open keep being served.

Shutdown (SIGINT/SIGTERM), the drain: close the listeners; keep reading and
answering every connection until it is at rest (nothing partial, nothing
owed, nothing heard for ``DRAIN_QUIET``), then close it at that message
boundary with the error frame ``server shutting down``: its client knows that
everything it sent before was answered and nothing after was read, so it may
resend elsewhere.  At the drain timeout every connection still open is closed
the same way (aborted if a reply is still being worked on), and whatever has
not finished closing ``DRAIN_GRACE`` later is aborted.  A second signal during
the drain aborts everything at once; the server then exits with status 1.

Outbound connections (``conn.loop.connect``) are not the server's: they
count toward no limit and the drain does not wait for them.  Once the loop
stops they get the handlers' clean-up time to close (a handler closes its
own in ``connection_lost``), then are aborted.

With a :class:`~muxsrv.auth.Gate`, each accepted connection is first
checked against protected mode and the brute-force ledger (turned away with
an error frame), then starts with the auth gate as its last stage.  With a
:class:`~muxsrv.proxying.Proxying` (``--proxy-protocol``), a connection from
outside ``--proxy-from`` is closed at once; the others start with the PROXY
header parser as their first stage, and the gate's checks wait for the
header: they are made on the client's address it carries.

With a :class:`~muxsrv.tls.TLSServer`, every connection has the TLS stage
(after any PROXY-header stage, before the auth gate), refused ones too: their
error frame goes inside TLS once the handshake is done.  While the
handshakes in flight are at ``--tls-max-handshakes``, accepting stops (the
listeners leave the selector) until one ends.

The whole-message deadline (``--frame-timeout``), the output limits
(``--max-output``, ``--output-soft-limit``) and the input budget
(``--max-buffered``) are kept by one periodic sweep
over the connections (``muxsrv.limits``), nothing per message; the hard
output limit also when a connection's output queue grows.

With ``--udp`` the server also owns a :class:`~muxsrv.udp.DatagramEndpoint`
bound on the TCP listeners' port (``--udp-only``: it alone); it counts toward
no connection limit, and at shutdown it closes at once (datagrams owe no
drain).

The server is the connections' owner (``connection.Owner``); a connection
never imports this module.
"""

from __future__ import annotations

import _socket
import errno
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .address import format_address
from .connection import Connection
from .framing import make_decoder
from .limits import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_SOFT_SECONDS,
    AddressCounts,
    InputBudget,
    LimitSweep,
)
from .listening import CannotListen, bind_addresses, bind_sockets
from .loop import EVENT_READ, EventLoop
from .outbound import connector_of
from .ratelog import RateLimitedLog
from .staged import StagedConnection
from .stats import Stats
from .tls import RefusalAfterHandshake
from .transport import LINGER_TIMEOUT
from .tuning import release_free_memory
from .udp import DEFAULT_MAX_PEERS, DEFAULT_MAX_QUEUE, DatagramEndpoint

if TYPE_CHECKING:
    from collections.abc import Callable

    from .auth import Gate
    from .handler import HandlerFactory, HandlerFunction
    from .proxying import Proxying
    from .stages import Stage
    from .tls import TLSServer

__all__ = ["CannotListen", "Server", "Settings", "bind_addresses", "bind_sockets"]

log = logging.getLogger("muxsrv.server")
limits_log = logging.getLogger("muxsrv.limits")  # connections refused

#: Connections accepted per wake-up of the listener, at most.
ACCEPT_BATCH: Final = 256
#: How long accept stays paused after EMFILE before trying again.
EMFILE_BACKOFF: Final = 0.1
#: Refused connections allowed to linger at once (beyond: closed outright).
MAX_REFUSED_LINGERING: Final = 1024
#: After the drain, how long handlers may keep descriptors registered
#: (to reap child processes, say) before the loop stops anyway.
HANDLER_CLEANUP_TIMEOUT: Final = 2.0
#: Draining: a connection that owes nothing and has been silent this long is closed ...
DRAIN_QUIET: Final = 0.2
#: ... checked this often.
DRAIN_SWEEP: Final = 0.05
#: After the drain timeout, how long goodbyes may take to finish closing.
DRAIN_GRACE: Final = LINGER_TIMEOUT + 0.5
_FD_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 9999
    framing: str = "length"
    max_frame: int = 16 * 1024 * 1024
    max_conns: int = 10000
    idle_timeout: float = 300.0
    drain_timeout: float = 5.0
    reuse_port: bool = False
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT  # 0: off (and with raw framing)
    max_conns_per_ip: int = 0  # 0: off
    max_output: int = DEFAULT_MAX_OUTPUT  # 0: off
    output_soft_limit: int = 0  # 0: off
    output_soft_seconds: float = DEFAULT_SOFT_SECONDS
    max_buffered: int = DEFAULT_MAX_BUFFERED  # 0: off
    handler_name: str = "echo"  # as the start-up line names it: "echo (built-in)"
    udp: str = "off"  # "also" (--udp), "only" (--udp-only)
    udp_max_peers: int = DEFAULT_MAX_PEERS
    udp_max_queue: int = DEFAULT_MAX_QUEUE
    udp_allow_low_ports: bool = False  # --udp-allow-low-ports


class _Listener:
    __slots__ = ("server", "sock")

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock

    def handle_event(self, mask: int) -> None:
        self.server._accept(self.sock)


class Server:
    """Accepts connections and owns them; the loop runs it."""

    def __init__(
        self,
        loop: EventLoop,
        settings: Settings,
        *,
        function: HandlerFunction | None = None,
        factory: HandlerFactory | None = None,
        stages: Callable[[], list[Stage]] | None = None,
        gate: Gate | None = None,
        tls: TLSServer | None = None,
        proxying: Proxying | None = None,
    ) -> None:
        if (function is None) == (factory is None):
            raise ValueError("give exactly one of function= and factory=")
        make_decoder(settings.framing, settings.max_frame)  # a bad framing fails here
        self.loop = loop
        self.settings = settings
        self.draining = False
        #: 0, or 1 after a second signal cut the drain short.
        self.exit_status = 0
        self._function = function
        self._factory = factory
        self._stages = stages
        self.gate = gate
        self.tls = tls
        if tls is not None:
            tls.on_slot_free = self._handshake_slot_freed
        self.proxying = proxying
        # A dict used as an ordered set: ~20 bytes a connection less than a set.
        self._conns: dict[Connection, None] = {}
        self._refused: set[Connection] = set()
        self._listeners: list[_Listener] = []
        self._accept_paused = False  # since EMFILE, until an accept succeeds
        self._listening = False  # the listeners are registered with the selector
        self._refuse_log = RateLimitedLog(limits_log)
        #: --max-conns-per-ip: its refusals have a log line (once a second) of their own.
        self._per_ip = (AddressCounts(settings.max_conns_per_ip)
                        if settings.max_conns_per_ip > 0 else None)
        self._per_ip_log = RateLimitedLog(limits_log)
        #: Asked by a connection about to read more of a large message (--max-buffered).
        self.input_budget = InputBudget(settings.max_buffered) if settings.max_buffered else None
        self._limits = LimitSweep(
            loop, self._conns.keys,
            frame_timeout=settings.frame_timeout if settings.framing != "raw" else 0.0,
            max_output=settings.max_output, soft_limit=settings.output_soft_limit,
            soft_seconds=settings.output_soft_seconds, budget=self.input_budget,
            release=release_free_memory,
        )
        #: Asked by a connection whose output queue grew (``Connection._output_grew``).
        self.max_output = settings.max_output
        #: The counters (``muxsrv.stats``), and the latency histogram connections add to.
        self.stats = Stats(settings.handler_name.split(" ")[0], {}, _version())
        self.latency = self.stats.latency
        #: --udp: the datagram endpoint, on the same host and port.
        self.udp = None if settings.udp == "off" else DatagramEndpoint(
            loop, function=function, factory=factory, max_peers=settings.udp_max_peers,
            max_queue=settings.udp_max_queue, idle_timeout=settings.idle_timeout,
            max_message=settings.max_frame, allow_low_ports=settings.udp_allow_low_ports,
            loopback_only=gate is not None and gate.protected and gate.tokens is None)

    # -- listening ----------------------------------------------------------

    def listen(
        self, sock: socket.socket | list[socket.socket] | None = None,
        udp: list[socket.socket] | None = None,
    ) -> list[tuple[str, int]]:
        """Bind the listening sockets (or adopt ``sock``, one or a list); their addresses.

        With ``--udp``, the UDP sockets too (or adopt ``udp``), on the TCP port
        (``self.udp.addresses``); with ``--udp-only``, only them, and the
        addresses are theirs.  Raises CannotListen (an OSError) naming the address.
        """
        settings = self.settings
        if settings.udp == "only":
            socks = []
        else:
            try:
                socks = (_bind(settings) if sock is None
                         else [sock] if isinstance(sock, socket.socket) else list(sock))
            except OSError as exc:
                raise CannotListen(settings.host, settings.port, exc) from exc
        if self.udp is not None:
            # --port 0 --udp: the port the kernel picked for TCP may be taken for UDP;
            # then the pair is bound again, on another port, a few times.
            retry = settings.port == 0 and sock is None and udp is None and bool(socks)
            for attempt in range(1, _PAIR_TRIES + 1):
                port = socks[0].getsockname()[1] if socks else settings.port
                try:
                    addresses = self.udp.listen(settings.host, port, udp)
                    break
                except OSError as exc:
                    for lsock in socks:
                        lsock.close()
                    if not (retry and exc.errno == errno.EADDRINUSE and attempt < _PAIR_TRIES):
                        raise CannotListen(settings.host, port, exc) from exc
                try:
                    socks = _bind(settings)
                except OSError as exc:
                    raise CannotListen(settings.host, settings.port, exc) from exc
            if not socks:
                return addresses
        for lsock in socks:
            lsock.setblocking(False)
            listener = _Listener(self, lsock)
            self._listeners.append(listener)
            self.loop.register(lsock, EVENT_READ, listener)
        self._listening = True
        if self.settings.idle_timeout > 0:
            self._schedule_idle_sweep()
        self._limits.start()
        return [lsock.getsockname()[:2] for lsock in socks]

    def _connection(
        self, sock: _socket.socket, peer: Any, handler: Any, last: Stage | None = None,
        first: Stage | None = None,
    ) -> Connection:
        settings = self.settings
        tls = self.tls
        # A ClientHello on a plaintext port is refused (the auth gate checks its own).
        decoder = make_decoder(settings.framing, settings.max_frame,
                               refuse_tls=tls is None and last is None)
        stages = self._stages() if self._stages is not None else None
        tls_stage = tls.stage() if tls is not None else None
        # Nearest the socket first: the PROXY header, any given stages, TLS, the auth gate.
        if first is not None or tls_stage is not None or last is not None:
            stages = [stage for stage in (first, *(stages or ()), tls_stage, last)
                      if stage is not None]
        kind = StagedConnection if stages else Connection
        conn = kind(self, sock, peer, decoder, self._function, handler, stages)
        stats = self.stats
        conn.id = stats.accepted + sum(stats.refused.values()) + 1
        if tls is not None and tls_stage is not None:
            tls.arm(self.loop, conn, tls_stage)
        return conn

    def _accept(self, lsock: socket.socket) -> None:
        settings = self.settings
        family = lsock.family
        tls = self.tls
        for _ in range(ACCEPT_BATCH):
            if tls is not None and tls.full:
                if self._listening:
                    self._refuse_log.warning(
                        "%d TLS handshakes in flight (--tls-max-handshakes): new connections "
                        "wait until one ends", tls.in_flight)
                self._stop_listening()  # until a handshake ends: _handshake_slot_freed
                return
            try:
                fd, peer = lsock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    self._pause_accepting(exc)
                    return
                log.error("accept failed: %s", exc)
                return
            if self._accept_paused:
                self._accept_paused = False
                log.warning("accepting connections again (%d open)", len(self._conns))
            # The bare C socket type: ~40 bytes less per connection than socket.socket.
            sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self._conns) >= settings.max_conns:
                self._refuse(sock, peer)
                continue
            self._open(sock, peer)

    def _open(self, sock: _socket.socket, peer: Any) -> None:
        gate = self.gate
        proxying = self.proxying
        if proxying is not None:
            if not proxying.trusts(peer):
                self._refuse_log.warning("refusing %s: not in --proxy-from", format_address(peer),
                                         peer=peer)
                self.stats.refuse("proxy_from")
                sock.close()
                return
        elif gate is not None:
            reason = gate.refusal(peer, self.loop.now)
            if reason is not None:
                self._turn_away(sock, peer, reason)
                return
        per_ip = self._per_ip
        if per_ip is not None and proxying is None and per_ip.full(peer):
            self._turn_away(sock, peer, per_ip.reason, self._per_ip_log)
            return
        try:
            handler = self._factory() if self._factory is not None else None
        except Exception:
            log.exception("handler factory failed; connection closed")
            sock.close()
            return
        stage = gate.stage(self.loop, peer) if gate is not None else None
        admitted: list[Connection] = []  # (the connection, for a PROXY header's count)
        refusal = self._refusal if per_ip is None else (
            lambda client: self._refusal_counted(client, admitted))
        header = proxying.stage(peer, refusal) if proxying is not None else None
        if stage is None and header is None:
            conn = self._connection(sock, None, handler)
        else:
            conn = self._connection(sock, peer, handler, stage, header)
        self._conns[conn] = None
        stats = self.stats
        stats.accepted += 1
        if len(self._conns) > stats.peak:
            stats.peak = len(self._conns)
        if per_ip is not None:
            if header is None:
                per_ip.add(conn, peer)
            else:
                admitted.append(conn)  # counted once its header names the client
        conn.start()
        if header is not None and proxying is not None:
            proxying.arm(self.loop, conn, header)
        if stage is not None and gate is not None:
            gate.arm(self.loop, conn, stage)

    def _refusal(self, peer: Any) -> str | None:
        """The gate's checks, on the address a PROXY header gave."""
        return self.gate.refusal(peer, self.loop.now) if self.gate is not None else None

    def _refusal_counted(self, peer: Any, admitted: list[Connection]) -> str | None:
        """``_refusal``, then --max-conns-per-ip on the header's address (counted if let in)."""
        reason = self._refusal(peer)
        per_ip = self._per_ip
        if reason is not None or per_ip is None or not admitted:
            return reason
        conn = admitted[0]
        if per_ip.full(peer):
            self._per_ip_log.warning("refusing %s: %s", format_address(peer), per_ip.reason,
                                     peer=peer)
            conn.log_quietly()  # logged just now, at most once a second: not once more
            return per_ip.reason
        per_ip.add(conn, peer)
        return None

    def _turn_away(self, sock: _socket.socket, peer: Any, reason: str,
                   log_to: RateLimitedLog | None = None) -> None:
        """Protected mode, a lock-out, an address's limit: an error frame, a lingering close."""
        (log_to or self._refuse_log).warning("refusing %s: %s", format_address(peer),
                                             reason.split(";")[0], peer=peer)
        self.stats.refuse("per_ip" if log_to is not None
                          else "protected" if "protected" in reason else "lockout")
        if len(self._refused) >= MAX_REFUSED_LINGERING:
            sock.close()
            return
        self._refuse_with(sock, peer, reason)

    def _refuse_with(self, sock: _socket.socket, peer: Any, reason: str) -> None:
        if self.tls is not None:
            # The frame must go inside TLS: a handler that refuses once the handshake is done.
            conn = self._connection(sock, peer, RefusalAfterHandshake(reason))
            self._refused.add(conn)
            conn.start()
            return
        conn = self._connection(sock, peer, None)
        self._refused.add(conn)
        conn.refuse(reason)

    def _refuse(self, sock: _socket.socket, peer: Any) -> None:
        self._refuse_log.warning(
            "refusing %s: too many connections (--max-conns %d)",
            format_address(peer), self.settings.max_conns, peer=peer,
        )
        self.stats.refuse("max_conns")
        if len(self._refused) >= MAX_REFUSED_LINGERING:
            sock.close()
            return
        self._refuse_with(sock, peer, f"too many connections (limit {self.settings.max_conns})")

    def _pause_accepting(self, exc: OSError) -> None:
        if not self._accept_paused:
            self._accept_paused = True
            self.stats.emfile += 1
            log.warning(
                "accept failed: %s; pausing accepts, still serving %d connections",
                exc.strerror, len(self._conns),
            )
        self._stop_listening()
        self.loop.call_later(EMFILE_BACKOFF, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.draining or self._listening:
            return
        for listener in self._listeners:
            self.loop.register(listener.sock, EVENT_READ, listener)
        self._listening = True

    def _handshake_slot_freed(self) -> None:
        if not self._accept_paused:  # (after EMFILE, its own backoff resumes)
            self._resume_accepting()

    def _stop_listening(self) -> None:
        # Not _accept_paused: that stays set after the listeners are back, until
        # an accept succeeds.
        if self._listening:
            for listener in self._listeners:
                self.loop.unregister(listener.sock)
            self._listening = False

    def connections(self) -> list[Connection]:
        """The connections open now (a copy)."""
        return list(self._conns)

    def connection_closed(self, conn: Connection) -> None:
        if self._conns.pop(conn, False) is None:  # (a refused one is not among the closed)
            self.stats.retire(conn.close_reason, conn.counts())
        if self._per_ip is not None:
            self._per_ip.forget(conn)
        if self.input_budget is not None:
            self.input_budget.forget(conn)
        if self.gate is not None:
            self.gate.forget(conn)
        if self.tls is not None:
            self.tls.forget(conn)
        if self.proxying is not None:
            self.proxying.forget(conn)
        self._refused.discard(conn)
        if self.draining and not self._conns:
            self.loop.stop()

    # -- idle timeouts --------------------------------------------------------

    def _schedule_idle_sweep(self) -> None:
        timeout = self.settings.idle_timeout
        # Sweep often enough that a connection closes within ~1/8 of its timeout late.
        self.loop.call_later(min(1.0, max(0.01, timeout / 8)), self._idle_sweep)

    def _idle_sweep(self) -> None:
        if self.draining:
            return
        now = self.loop.now
        timeout = self.settings.idle_timeout
        for conn in [c for c in self._conns if now - c.last_active >= timeout]:
            conn.check_idle(now, timeout)
        self._schedule_idle_sweep()

    # -- shutdown ---------------------------------------------------------------

    def shutdown(self) -> None:
        """The drain (see the module docstring); a second call stops at once."""
        if self.draining:
            log.warning("second signal: closing %d connections now", len(self._conns))
            self.exit_status = 1
            self._abort_all()
            self.loop.stop()
            return
        log.info("shutting down: draining %d connections (up to %g s)",
                 len(self._conns), self.settings.drain_timeout)
        self.draining = True
        if self.udp is not None:
            self.udp.close()  # datagrams owe nothing: no drain
        self._limits.stop()
        self._stop_listening()
        for listener in self._listeners:
            listener.sock.close()
        self._listeners.clear()
        if not self._conns:
            self.loop.stop()
            return
        self.loop.call_later(self.settings.drain_timeout, self._drain_expired)
        self._drain_sweep()

    def _drain_sweep(self) -> None:
        if not self.draining or not self._conns:
            return
        now = self.loop.now
        for conn in [c for c in self._conns if c.at_rest(now, DRAIN_QUIET)]:
            conn.say_goodbye()
        self.loop.call_later(DRAIN_SWEEP, self._drain_sweep)

    def _drain_expired(self) -> None:
        if self._conns:
            log.warning("drain timeout: closing %d connections still busy", len(self._conns))
        for conn in list(self._conns):
            conn.say_goodbye()
        self.loop.call_later(DRAIN_GRACE, self._drain_over)

    def _drain_over(self) -> None:
        self._abort_all()
        self.loop.stop()

    def _abort_all(self) -> None:
        for conn in list(self._conns) + list(self._refused):
            conn.abort()
        if self.exit_status:
            connector_of(self.loop).abort_all()  # a second signal: everything, now

    def run(self) -> None:
        """Run the loop until shutdown has drained, then let handlers clean up."""
        self.loop.run_forever()
        if self.udp is not None:
            self.udp.close()
        self._abort_all()
        self.loop.run_once(max_wait=0)  # connection_lost for what was just aborted
        outbound = connector_of(self.loop)
        self.loop.run_until(lambda: self.loop.watched_fds == 0 and not outbound.conns,
                            HANDLER_CLEANUP_TIMEOUT)
        outbound.abort_all()
        self.loop.run_once(max_wait=0)  # their connection_lost


#: Binds of the TCP+UDP pair for ``--port 0 --udp``, at most (the UDP port may be taken).
_PAIR_TRIES: Final = 5


def _version() -> str:
    from .options import program_version

    return program_version("muxsrv").split()[-1]


def _bind(settings: Settings) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to, on one port."""
    backlog = socket.SOMAXCONN if socket.SOMAXCONN > 4096 else 4096
    return bind_sockets(settings.host, settings.port, settings.reuse_port,
                        lambda sock: sock.listen(backlog))
