"""The codec interface: a :class:`Decoder` cuts messages out of bytes and frames replies.

This module holds what every framing shares: the base class, the error types,
the batch limit, and ``as_payload``, which decides what a reply may be.  The
framings themselves are in ``muxsrv.length`` (length-prefixed frames) and
``muxsrv.framing`` (lines, raw chunks, and ``make_decoder``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeAlias

#: What codecs accept as bytes: anything with the buffer protocol we use.
Buffer: TypeAlias = bytes | bytearray | memoryview
#: A function handler: a payload in, a reply (or None: no reply) out.
ReplyFunction: TypeAlias = Callable[[bytes], Buffer | None]
#: Told of a failing handler; False means the connection is ending.
Failed: TypeAlias = Callable[[Exception], bool]

__all__ = [
    "ERROR_FLAG",
    "MAX_BATCH",
    "MAX_FRAME_LIMIT",
    "SHUTTING_DOWN",
    "TLS_ON_PLAINTEXT",
    "Buffer",
    "Decoder",
    "ErrorFrame",
    "FramingError",
    "as_payload",
    "opens_tls_record",
]

#: The error frame a draining server sends before it closes: every message before
#: it was answered, none after it was read, so a client may resend those.
SHUTTING_DOWN: Final = "server shutting down"
#: The length word's top bit marks an error frame (server to client only).
ERROR_FLAG: Final = 0x80000000
#: The largest --max-frame: with the top bit reserved, a length word holds 2**31-1.
MAX_FRAME_LIMIT: Final = 0x7FFFFFFF
#: Messages one ``feed``/``respond`` call hands out at most (about a millisecond
#: of handler calls); the rest waits inside the decoder (``more``).
MAX_BATCH: Final = 1024
#: Why a plaintext server closes a connection whose first bytes open a TLS record.
TLS_ON_PLAINTEXT: Final = "looks like TLS: a TLS ClientHello on a plaintext port"


class FramingError(Exception):
    """The peer broke the framing rules; the message says how."""


class ErrorFrame(bytes):
    """An error frame's payload, as a client's decoder returns it (server text, UTF-8)."""

    @property
    def text(self) -> str:
        return self.decode("utf-8", "replace")


class Decoder:
    """Base decoder: byte stream in, list of messages out.  Subclasses fill in."""

    __slots__ = ("completions", "error", "extra", "max_frame", "more", "silent")

    #: The framing's name, as ``--framing`` takes it.
    framing: str = ""

    #: Bytes of a large message still to come that may be read with ``recv(want)``
    #: and given to ``body_received`` instead of going through ``feed``.
    want: int = 0

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.error: str | None = None
        #: Bytes already given to the decoder hold more messages than one call
        #: hands out: call ``feed(b"")`` (or ``respond``) again for them.
        self.more = False
        #: Messages finished from bytes held over from an earlier call (a running
        #: count, bumped once per read at most, never per message): while it stands
        #: still and ``buffered`` is not 0, the same message is still unfinished
        #: (``muxsrv.limits``'s frame deadline compares it).
        self.completions = 0
        #: For the counters (muxsrv.stats), kept off the common path: messages whose
        #: function returned None, and buffers beyond one that a reply was framed in.
        self.silent = self.extra = 0

    def feed(self, data: Buffer) -> list[bytes]:
        """The next bytes of the stream; every message they complete, in order."""
        raise NotImplementedError

    def body_received(self, chunk: bytes) -> bytes | None:
        """At most ``want`` bytes of a large message; the message once it is whole."""
        raise NotImplementedError

    def eof(self) -> list[bytes]:
        """The peer sent EOF: return any final message (only ``line`` has one)."""
        return []

    @staticmethod
    def encode(out: list[Buffer], payload: Buffer) -> None:
        """Append the framed ``payload`` (bytes-like; see ``as_payload``) to ``out``."""
        raise NotImplementedError

    def encode_parts(self, out: list[Buffer], parts: list[Buffer]) -> None:
        """Append one message made of ``parts`` (joined, unless the framing can gather)."""
        self.encode(out, b"".join(parts))

    @staticmethod
    def error_frame(text: str) -> bytes | None:
        """An error message as this framing sends it; None: it has no error channel."""
        return None

    def respond(self, data: Buffer, fn: ReplyFunction, out: list[Buffer], failed: Failed) -> None:
        """``feed(data)``, then ``fn`` on each message, each reply encoded into ``out``.

        The function handler's whole path in one call: codecs may fuse the
        three steps (``LengthDecoder`` does).  When ``fn`` raises, or returns
        something that is not bytes, ``failed(exc)`` is told; if it returns
        False the connection is ending and nothing more is done.
        """
        for payload in self.feed(data):
            if not self.reply(fn, payload, out, failed):
                return

    def reply(self, fn: ReplyFunction, payload: bytes, out: list[Buffer], failed: Failed) -> bool:
        """Call ``fn`` on one message and encode its reply; False: the connection ends."""
        try:
            reply = fn(payload)
        except Exception as exc:
            return failed(exc)
        if reply is None:
            self.silent += 1
            return True
        n = len(out)
        try:
            self.encode(out, as_payload(reply, returned=True))
        except (TypeError, ValueError) as exc:
            return failed(exc)
        self.extra += len(out) - n - 1
        return True

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished message."""
        return 0

    def discard(self) -> None:
        """Let go of an unfinished message (its connection is being closed)."""



def _never_fails(exc: Exception) -> bool:
    raise AssertionError("no handler runs while only cutting messages") from exc


def as_payload(part: object, returned: bool = False) -> Buffer:
    """``part`` as a buffer whose ``len`` is its size in bytes; TypeError if not bytes-like.

    ``returned``: the error message speaks of a function handler's return value.
    """
    if isinstance(part, (bytes, bytearray)):
        return part
    if isinstance(part, memoryview):
        if part.itemsize == 1 and part.ndim == 1:
            return part
        return part.cast("B") if part.c_contiguous else part.tobytes()
    name = type(part).__name__
    if returned:
        raise TypeError(f"handler returned {name}; expected bytes or None")
    raise TypeError(f"send() takes bytes, not {name}")


def _check_size(size: int) -> None:
    if size > MAX_FRAME_LIMIT:
        raise ValueError(
            f"a reply of {size} bytes does not fit a length frame (at most {MAX_FRAME_LIMIT})"
        )


def opens_tls_record(head: bytes) -> bool | None:
    """Do a stream's first bytes open a TLS handshake record (a ClientHello)?

    A record header is type 22, then version 3.0 to 3.4: ``16 03 00``..``16 03 04``.
    None: fewer than three bytes, all of them matching so far (too few to tell).
    """
    if not head:
        return None
    if head[0] != 0x16:
        return False
    if len(head) < 2:
        return None
    if head[1] != 0x03:
        return False
    if len(head) < 3:
        return None
    return head[2] <= 0x04
