"""The TLS stage: a server-side ``ssl.SSLObject`` on two memory BIOs.

This is the design asyncio's ``sslproto.py`` and trio's ``_ssl.py`` share:
the stage never sees a socket.  Ciphertext from the peer goes into the
incoming BIO; whatever OpenSSL wants to say (handshake records, alerts,
encrypted replies, close_notify) collects in the outgoing BIO and leaves with
the next ``send``, which the connection calls after every ``receive``
(``send(b"")`` asks for the stage's own output: the handshake's).

* ``receive``: feed the ciphertext, drive the handshake while it runs
  (``ready`` stays False until it is done), then read plaintext **until
  OpenSSL wants more bytes**: decrypted data held inside the object does not
  make the socket readable, so stopping after one ``read`` would stall a
  pipelining client (the classic trap).
* A close_notify from the peer is a half-close: ``eof`` turns True, the
  connection treats it as the peer's EOF (every owed reply still delivered),
  and ``finish`` answers with our own close_notify.  A plain TCP EOF with no
  close_notify is a truncated close: logged as such, not an error.
* Bytes that are not a TLS record (a plaintext client on a TLS port) or a
  failed handshake set ``error`` with a one-line reason: logged, closed, no
  traceback.

The stage only counts; what to do once the handshake is done (stop its
timeout, free a handshake slot) is the ``on_handshake`` callback's.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from . import Stage

if TYPE_CHECKING:
    from ..codec import Buffer

__all__ = ["TLS_RECORD_TYPES", "TLSStage", "looks_like_tls"]

log = logging.getLogger("muxsrv.tls")

#: The first byte of every TLS record: change_cipher_spec, alert, handshake, data.
TLS_RECORD_TYPES: Final = frozenset({0x14, 0x15, 0x16, 0x17})
#: Plaintext read from the SSLObject per call (it decrypts at most a record at once).
READ_SIZE: Final = 256 * 1024


def looks_like_tls(data: bytes) -> bool:
    """Do these first bytes of a connection look like a TLS ClientHello?"""
    return len(data) >= 2 and data[0] == 0x16 and data[1] == 0x03


class TLSStage(Stage):
    """One connection's TLS session, server side."""

    ready = False

    def __init__(self, context: ssl.SSLContext,
                 on_handshake: Callable[[], None] | None = None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._started = False  # the first bytes arrived (and looked like TLS)
        self._pending: list[bytes] = []  # plaintext sent before the handshake ended
        self._closed = False  # our close_notify is out (or there is none to send)
        self._refusal: str | None = None  # to tell the peer once the handshake is done
        #: Called once, when the handshake is done.
        self.on_handshake = on_handshake
        #: The peer sent close_notify: it will send nothing more.
        self.eof = False
        #: The peer's verified certificate (``getpeercert()``), with mutual TLS.
        self.peer_cert: dict[str, Any] | None = None
        #: How the session ended, for the log: "clean", "truncated" or None.
        self.ending: str | None = None
        #: Names the peer in log lines.
        self.describe: Callable[[], str] = lambda: "a client"

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    def receive(self, data: bytes) -> bytes:
        if self.error is not None or self.eof:
            return b""
        if not self._started and data:
            if data[0] not in TLS_RECORD_TYPES:
                self.error = "not TLS: the client's first bytes are not a TLS record"
                return b""
            self._started = True
        self._incoming.write(data)
        if not self.ready:
            if not self._handshake():
                return b""
            if self._refusal is not None:  # (defer_refusal): the error frame goes inside TLS
                self._read()  # dropped; it lets OpenSSL end its side (TLS 1.3 tickets)
                if self.error is None:
                    self.error = self._refusal
                    self.tell_peer = True
                return b""
        return self._read()

    def defer_refusal(self, reason: str) -> bool:
        """A refusal decided before the handshake (on a PROXY header's address)."""
        if self.ready or self.error is not None:
            return False
        self._refusal = reason
        return True

    def _handshake(self) -> bool:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            self.error = f"TLS handshake failed: {exc.reason or exc}"
            return False
        self.ready = True
        self.peer_cert = self._ssl.getpeercert() or None
        if self._pending:
            pending, self._pending = self._pending, []
            self._write(b"".join(pending))
        if self.on_handshake is not None:
            self.on_handshake()
        return True

    def _read(self) -> bytes:
        chunks = []
        read = self._ssl.read
        decrypted = self._ssl.pending
        incoming = self._incoming
        try:
            while True:  # until OpenSSL wants more ciphertext: nothing left inside
                chunk = read(READ_SIZE)
                if not chunk:  # (b"": the peer's close_notify, as SSLZeroReturnError is)
                    self._close_notified()
                    break
                chunks.append(chunk)
                if not incoming.pending and not decrypted():
                    # Every byte fed is inside OpenSSL and none of it is plaintext
                    # waiting: at most part of a record, which needs more bytes.  A read
                    # now would only raise SSLWantReadError (costly: a few us a time).
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._close_notified()
        except ssl.SSLError as exc:
            self.error = f"TLS error: {exc.reason or exc}"
            return b""
        return b"".join(chunks)

    def _close_notified(self) -> None:
        self.eof = True
        self.ending = "clean"
        log.info("%s: TLS close_notify received (a clean close)", self.describe(),
                 extra={"peer": self.describe()})

    def receive_eof(self) -> None:
        """The TCP connection ended with no close_notify before it: a truncated close."""
        if self.ending is None:
            self.ending = "truncated"  # replies still go: the peer may only have shut writing
            if self.ready:
                log.info("%s: TLS connection truncated: EOF without close_notify",
                         self.describe(), extra={"peer": self.describe()})
            elif self._started:
                log.info("%s: closed during the TLS handshake", self.describe(),
                         extra={"peer": self.describe()})

    def send(self, data: bytes) -> bytes:
        if data and not self._closed:
            if self.ready:
                self._write(data)
            else:
                self._pending.append(data)  # e.g. a refusal queued before the handshake
        return self._outgoing.read() if self._outgoing.pending else b""

    def send_buffer(self, data: Buffer) -> bytes:
        """``send`` for one large buffer: written into OpenSSL as it is, no join."""
        if not self.ready or self._closed:
            return self.send(bytes(data))
        self._write(data)
        return self._outgoing.read() if self._outgoing.pending else b""

    def _write(self, data: Buffer) -> None:
        written = self._ssl.write(data)
        if written < len(data):  # write() takes at most what fits the records it makes
            view = memoryview(data)[written:]
            while view:
                view = view[self._ssl.write(view):]

    def finish(self) -> bytes:
        """The connection is closing: our close_notify (once, after a handshake)."""
        if self._closed:
            return b""
        self._closed = True
        told = self.error is not None and self.error == self._refusal
        if self.ready and (self.error is None or told) and self.ending != "truncated":
            try:
                self._ssl.unwrap()
            except ssl.SSLWantReadError:
                pass  # sent ours; the peer's may never come, and we do not wait
            except ssl.SSLError:
                return b""
        return self._outgoing.read() if self._outgoing.pending else b""
