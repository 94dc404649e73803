"""TLS for a server: the context from the certificate files, and handshakes bounded.

The per-connection work is the sans-IO stage in ``muxsrv.stages.tls``; this
module holds what the connections of one server share:

* the ``ssl.SSLContext`` (TLS 1.2 at least; with ``--tls-client-ca``, client
  certificates signed by that CA are required), built by :func:`load_context`,
  which raises :class:`TLSConfigError` with one line naming the file;
* the handshakes in flight: each has a timeout (``--tls-handshake-timeout``:
  closed, logged) and there are at most ``max_handshakes`` at once.  When
  that many are running the server stops accepting (its listeners leave the
  selector, as on EMFILE), so further connections wait unread in the
  kernel's backlog until a handshake ends; established connections go on
  being served.  ``on_slot_free`` tells the server when to accept again;
* ``reload`` (SIGHUP): a new context from the same files for the connections
  accepted after it; a bad file is logged and the old context kept.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .address import format_address
from .handler import Handler
from .stages.tls import TLSStage

if TYPE_CHECKING:
    from .connection import Connection
    from .handler import Conn
    from .loop import EventLoop, Timer

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_MAX_HANDSHAKES", "RefusalAfterHandshake",
           "TLSConfigError", "TLSServer", "load_context"]

log = logging.getLogger("muxsrv.tls")

#: A client that has not finished its handshake this long after connecting is closed.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
#: Handshakes in flight at once; beyond, new connections wait unread.
DEFAULT_MAX_HANDSHAKES: Final = 1000


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message names it (never key bytes)."""


def load_context(cert: str, key: str | None = None, client_ca: str | None = None) -> ssl.SSLContext:
    """A server context: TLS 1.2 or 1.3, the certificate chain, optionally mutual TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TLSConfigError(f"--tls-cert/--tls-key: {exc.filename}: no such file") from None
    except OSError as exc:  # ssl.SSLError is one: the reason, not the key's bytes
        what = f"--tls-cert {cert}" + (f" / --tls-key {key}" if key else "")
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise TLSConfigError(f"{what}: cannot load the certificate and key ({reason})") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise TLSConfigError(f"--tls-client-ca {client_ca}: cannot load ({reason})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TLSServer:
    """One server's TLS: its context and the handshakes its connections have in flight."""

    def __init__(
        self,
        context: ssl.SSLContext,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        mutual: bool = False,
        files: tuple[str, str | None, str | None] | None = None,
    ) -> None:
        self.context = context
        #: (cert, key, client CA) as given: what ``reload`` reads again.
        self.files = files
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        #: Client certificates are required (``--tls-client-ca``): that is authentication.
        self.mutual = mutual
        #: Called when a handshake slot frees while the server had stopped accepting.
        self.on_slot_free: Callable[[], None] | None = None
        # The connections still handshaking, and their timeouts: its size is the count.
        self._handshaking: dict[Connection, Timer | None] = {}

    def reload(self) -> bool:
        """SIGHUP: read the files again for new connections; a bad one is logged, the old kept."""
        if self.files is None:
            return False
        try:
            context = load_context(*self.files)
        except TLSConfigError as exc:
            log.error("%s; keeping the certificate loaded before", exc)
            return False
        self.context = context  # open connections keep the session they have
        log.debug("re-read --tls-cert, --tls-key and --tls-client-ca")  # the caller says it
        return True

    @property
    def full(self) -> bool:
        """As many handshakes in flight as allowed: accept no more for now."""
        return len(self._handshaking) >= self.max_handshakes

    @property
    def in_flight(self) -> int:
        return len(self._handshaking)

    def stage(self) -> TLSStage:
        return TLSStage(self.context)

    def arm(self, loop: EventLoop, conn: Connection, stage: TLSStage) -> None:
        """Count ``conn``'s handshake and time it out; the stage says when it is done."""
        timer = None
        if self.handshake_timeout > 0:
            timer = loop.call_later(self.handshake_timeout, self._expire, conn)
        self._handshaking[conn] = timer
        stage.on_handshake = lambda: self._done(conn)
        stage.describe = lambda: format_address(conn.peer)

    def _done(self, conn: Connection) -> None:
        self.forget(conn)

    def _expire(self, conn: Connection) -> None:
        self._handshaking[conn] = None  # fired: nothing to cancel
        log.info("closing %s: TLS handshake not done within %g s (--tls-handshake-timeout)",
                 format_address(conn.peer), self.handshake_timeout,
                 extra={"peer": format_address(conn.peer)})
        conn.abort()  # it has said nothing TLS can answer; forget() runs as it closes

    def forget(self, conn: Connection) -> None:
        """The handshake ended (done, or the connection closed): free its slot."""
        was_full = self.full
        if conn not in self._handshaking:
            return
        timer = self._handshaking.pop(conn)
        if timer is not None:
            timer.cancel()
        if was_full and self.on_slot_free is not None:
            self.on_slot_free()


class RefusalAfterHandshake(Handler):
    """Turns a connection away once its handshake is done: the error frame goes inside TLS."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def connection_made(self, conn: Conn) -> None:
        conn.send_error(self.reason)
        conn.close()
