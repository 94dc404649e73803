"""Token authentication and protected mode: who may reach the handler at all.

The gate is a one-shot stage (see ``muxsrv.stages``) nearest the codec.  It
reads the connection's first message itself, in the connection's framing,
and lets nothing else through until that message is ``AUTH <token>`` with a
known token:

* a first message longer than ``MAX_AUTH_MESSAGE`` is refused on its length
  prefix (or once a line has run past it), nothing of it buffered;
* a right token: the gate leaves the path, queueing ``OK`` as it goes, and
  hands on the bytes after the AUTH message (AUTH may be pipelined); only then
  does the handler's ``connection_made`` run.  The connection then has no
  stage left and runs the plain hot path: nothing is paid per message;
* a wrong or empty token: ``authentication failed``; anything else:
  ``authentication required``; either closes the connection.

Tokens are compared as SHA-256 digests with ``hmac.compare_digest`` against
every stored one, so timing reveals neither a token nor its length.  No token
ever reaches a log line or an error message.

The :class:`FailureLedger` counts wrong tokens per peer address and locks an
address out after ``MAX_FAILURES`` within ``FAILURE_WINDOW``; it holds at most
``LEDGER_MAX`` addresses, so many addresses cannot grow it without bound.

Protected mode (:meth:`Gate.refusal`): a server that listens beyond loopback
with no authentication serves only loopback peers.  Both checks use the peer
address the connection has.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from typing import TYPE_CHECKING, Any, Final

from .address import format_address
from .codec import TLS_ON_PLAINTEXT, opens_tls_record
from .length import encode_length
from .stages import Stage

if TYPE_CHECKING:
    from .codec import Buffer
    from .connection import Connection
    from .loop import EventLoop, Timer

__all__ = [
    "AUTH_FAILED",
    "AUTH_REQUIRED",
    "AUTH_TIMEOUT",
    "LOCKED_OUT",
    "MIN_TOKEN_BYTES",
    "PROTECTED_MODE",
    "AuthGate",
    "FailureLedger",
    "Gate",
    "TokenFileError",
    "Tokens",
    "is_loopback_peer",
    "read_token_file",
    "read_tokens",
]

log = logging.getLogger("muxsrv.auth")

#: The longest first message before authentication: an AUTH line needs no more.
MAX_AUTH_MESSAGE: Final = 1024
#: A shorter token is guessable: refused at start (and on reload).
MIN_TOKEN_BYTES: Final = 16
#: Wrong tokens from one address within FAILURE_WINDOW seconds that lock it out ...
MAX_FAILURES: Final = 10
FAILURE_WINDOW: Final = 60.0
#: ... for this long.
LOCKOUT: Final = 60.0
#: Addresses the ledger remembers at most (~200 bytes each: a few MB at worst).
LEDGER_MAX: Final = 10_000

AUTH_PREFIX: Final = b"AUTH "
AUTH_FAILED: Final = "authentication failed"
AUTH_REQUIRED: Final = "authentication required"
AUTH_TIMEOUT: Final = "authentication timeout"
LOCKED_OUT: Final = "too many failed authentication attempts"
PROTECTED_MODE: Final = (
    "protected mode: this server listens on a non-loopback address without authentication, "
    "so it serves loopback clients only; start it with --auth-token-file FILE to require a "
    "token, with --tls-client-ca FILE to require client certificates, or with "
    "--no-protected-mode to serve every client"
)


# -- the token file -----------------------------------------------------------


class TokenFileError(Exception):
    """The token file cannot be used; the message names the file, never a token."""


def read_tokens(path: str, option: str = "--auth-token-file") -> list[bytes]:
    """The tokens in ``path``, in file order; TokenFileError (naming ``option``) if unusable.

    One token per line; blank lines and ``#`` comments are skipped; a token is
    the line's bytes with surrounding whitespace stripped, at least
    ``MIN_TOKEN_BYTES`` long.  Clients (the Locust kit) read their file with it too.
    """
    try:
        with open(path, "rb") as file:
            lines = file.read().split(b"\n")
    except OSError as exc:
        raise TokenFileError(f"{option} {path}: {exc.strerror or exc}") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith(b"#"):
            continue
        if len(token) < MIN_TOKEN_BYTES:
            raise TokenFileError(
                f"{option} {path}: line {number}: a token must be at least "
                f"{MIN_TOKEN_BYTES} bytes long"
            )
        tokens.append(token)
    if not tokens:
        raise TokenFileError(f"{option} {path}: no token in the file")
    return tokens


def read_token_file(path: str) -> frozenset[bytes]:
    """The SHA-256 digests of the tokens in ``path``; TokenFileError if unusable."""
    return frozenset(hashlib.sha256(token).digest() for token in read_tokens(path))


class Tokens:
    """The tokens a server accepts, re-read from their file on demand (SIGHUP)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._digests = read_token_file(path)

    def reload(self) -> bool:
        """Re-read the file; a bad one is logged and the old tokens kept."""
        try:
            digests = read_token_file(self.path)
        except TokenFileError as exc:
            log.error("%s; keeping the %d tokens loaded before", exc, len(self._digests))
            return False
        self._digests = digests
        log.debug("re-read --auth-token-file: %d tokens", len(digests))  # the caller says it
        return True

    @property
    def count(self) -> int:
        return len(self._digests)

    def accepts(self, candidate: bytes) -> bool:
        """Is ``candidate`` one of the tokens?  Time depends on neither its value nor length."""
        digest = hashlib.sha256(candidate).digest()
        found = False
        for stored in self._digests:  # no early exit: every digest is compared
            found |= hmac.compare_digest(digest, stored)
        return found and len(candidate) > 0


# -- brute force ----------------------------------------------------------------


class FailureLedger:
    """Wrong tokens per address: after MAX_FAILURES in FAILURE_WINDOW, LOCKOUT seconds out."""

    def __init__(self, max_entries: int = LEDGER_MAX) -> None:
        self.max_entries = max_entries
        # address -> [window start, failures in it, locked until (0: not locked)]
        self._entries: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def locked(self, address: str, now: float) -> bool:
        entry = self._entries.get(address)
        if entry is None or entry[2] == 0.0:
            return False
        if now < entry[2]:
            return True
        del self._entries[address]  # the episode is over: a fresh count
        return False

    def failed(self, address: str, now: float) -> bool:
        """Count a wrong token; True when this one locks the address out (log once)."""
        entry = self._entries.get(address)
        if entry is None or (now - entry[0] >= FAILURE_WINDOW and entry[2] == 0.0):
            if entry is None and len(self._entries) >= self.max_entries:
                self._make_room(now)
            entry = self._entries[address] = [now, 0.0, 0.0]
        entry[1] += 1
        if entry[2] == 0.0 and entry[1] >= MAX_FAILURES:
            entry[2] = now + LOCKOUT
            return True
        return False

    def _make_room(self, now: float) -> None:
        """Forget what has expired; if still full, the oldest (insertion order)."""
        for address, (start, _count, until) in list(self._entries.items()):
            if (until == 0.0 and now - start >= FAILURE_WINDOW) or (until and now >= until):
                del self._entries[address]
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]


# -- the gate -------------------------------------------------------------------


def peer_host(peer: Any) -> str:
    """The address part of a peer, as the ledger keys it."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def is_loopback_peer(peer: Any) -> bool:
    """Is the peer on this machine (a loopback address, or a Unix socket)?"""
    if not isinstance(peer, tuple):
        return True  # AF_UNIX: a path, or "" for an unnamed socket
    try:
        address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class Gate:
    """A server's authentication settings, shared by all its connections."""

    def __init__(
        self,
        framing: str,
        tokens: Tokens | None,
        timeout: float = 10.0,
        protected: bool = False,
        ledger: FailureLedger | None = None,
    ) -> None:
        if tokens is not None and framing not in ("length", "line"):
            raise ValueError(f"token authentication needs message boundaries, not {framing}")
        self.framing = framing
        self.tokens = tokens
        self.timeout = timeout
        self.protected = protected
        self.ledger = ledger if ledger is not None else FailureLedger()
        #: Authentication timeouts of the open connections (see ``forget``).
        self._timers: dict[Connection, Timer] = {}

    def refusal(self, peer: Any, now: float) -> str | None:
        """Why a new connection from ``peer`` is turned away at once; None: it is not."""
        if self.protected and not is_loopback_peer(peer):
            return PROTECTED_MODE
        if self.tokens is not None and self.ledger.locked(peer_host(peer), now):
            return LOCKED_OUT
        return None

    def stage(self, loop: EventLoop, peer: Any) -> AuthGate | None:
        """The stage a new connection starts with (None: no authentication)."""
        if self.tokens is None:
            return None
        return AuthGate(self, loop, peer)

    def arm(self, loop: EventLoop, conn: Connection, stage: AuthGate) -> None:
        """Close ``conn`` if it has not authenticated within the timeout."""
        if self.timeout > 0:
            stage.timer = self._timers[conn] = loop.call_later(self.timeout, _expire, conn, stage)

    def forget(self, conn: Connection) -> None:
        """``conn`` closed: cancel its timer (a storm of short connections piles up none)."""
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()


def _expire(conn: Connection, stage: AuthGate) -> None:
    stage.timer = None
    if not (stage.ready or stage.error is not None or conn.closing):
        log.info("closing %s: %s", format_address(conn.peer), AUTH_TIMEOUT,
                 extra={"peer": format_address(conn.peer)})
        stage.error = AUTH_TIMEOUT  # nothing more passes
        conn.refuse(AUTH_TIMEOUT)


class AuthGate(Stage):
    """One connection's gate: its first message must be ``AUTH <token>``."""

    ready = False

    def __init__(self, gate: Gate, loop: EventLoop, peer: Any) -> None:
        self._gate = gate
        self._loop = loop
        self.peer = peer  # a PROXY header's address, once the stage before has read it
        self._buffer = b""
        self._parting: list[Buffer] = []
        #: The timeout's timer, cancelled once authenticated.
        self.timer: Timer | None = None

    def receive(self, data: bytes) -> bytes:
        if self.done or self.error is not None:
            return data
        buffer = self._buffer + data if self._buffer else data
        cut = self._cut_frame(buffer) if self._gate.framing == "length" else self._cut_line(buffer)
        if cut is None:
            self._buffer = buffer if self.error is None else b""
            return b""
        message, rest = cut
        self._buffer = b""
        self._check(message)
        return rest if self.done else b""

    def _cut_frame(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        if len(buffer) < 4:
            return None
        size = int.from_bytes(buffer[:4], "big")
        if size > MAX_AUTH_MESSAGE:
            self._refuse(TLS_ON_PLAINTEXT if size >> 16 == 0x1603 else
                         f"a message of {size} bytes before authentication "
                         f"(at most {MAX_AUTH_MESSAGE})")
            return None
        if len(buffer) < 4 + size:
            return None
        return buffer[4:4 + size], buffer[4 + size:]

    def _cut_line(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        if opens_tls_record(buffer[:3]):
            self._refuse(TLS_ON_PLAINTEXT)
            return None
        end = buffer.find(b"\n", 0, MAX_AUTH_MESSAGE + 1)
        if end < 0:
            if len(buffer) > MAX_AUTH_MESSAGE:
                self._refuse(f"a line longer than {MAX_AUTH_MESSAGE} bytes before authentication")
            return None
        line = buffer[:end]
        return line[:-1] if line.endswith(b"\r") else line, buffer[end + 1:]

    def _check(self, message: bytes) -> None:
        gate = self._gate
        assert gate.tokens is not None
        if not message.startswith(AUTH_PREFIX):
            self._refuse(AUTH_REQUIRED)
            return
        if not gate.tokens.accepts(message[len(AUTH_PREFIX):]):
            host = peer_host(self.peer)
            if gate.ledger.failed(host, self._loop.now):
                log.warning("locking out %s for %g s: %d failed authentication attempts "
                            "within %g s", host, LOCKOUT, MAX_FAILURES, FAILURE_WINDOW,
                            extra={"peer": format_address(self.peer), "host": host})
            self._refuse(AUTH_FAILED)
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        out: list[Buffer] = []
        if gate.framing == "length":
            encode_length(out, b"OK")
        else:
            out.append(b"OK\n")
        self._parting = out
        self.ready = True
        self.done = True
        log.debug("%s authenticated", format_address(self.peer),
                  extra={"peer": format_address(self.peer)})

    def _refuse(self, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.error = reason
        self.tell_peer = True

    def parting(self) -> list[Buffer]:
        """What the gate says as it leaves the path (``OK``), as codec output."""
        out, self._parting = self._parting, []
        return out

