"""The muxsrv wire protocol as a load generator sees it: bytes in, frames out.

Sans-IO like the server's codecs: it never touches a socket, so every rule in
it can be tested with plain bytes, and nothing here imports Locust or gevent
(importing Locust monkey-patches the whole process).  ``muxsrv.locust`` reads
its replies with it.

It is deliberately independent of ``muxsrv.framing``: a load test that checked
replies with the server's own codec would share that codec's bugs.

* ``length``: a 4-byte unsigned big-endian length N, then N payload bytes.  A
  length word with the top bit set is an *error frame*, which only the server
  sends: the low 31 bits count bytes of UTF-8 text (``GOODBYE``: the server is
  shutting down, and what it did not answer may be resent).
* ``line``: every reply is followed by ``\n``; the frame is the bytes before it.
* ``raw``: no boundaries at all: the reader asks for a number of bytes
  (``maybe_next_frame(size)``), or for whatever has arrived (``size=None``).

``judge_one`` and ``judge_all`` turn a check into the failure it found, if any.

A client feeds whatever it received to ``receive_data`` and calls
``maybe_next_frame`` until it returns None; ``make_decoder(framing)`` and
``encode(framing, payload)`` pick the framing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from .errors import ServerError as ServerError  # the one muxsrv.ServerError, re-exported

FRAMINGS = ("length", "line", "raw")
# check(sent_payload, reply_payload): raise (any Exception) or return False to fail.
Check = Callable[[bytes, bytes], object]
# The same for a request made with replies=: it sees every reply, in order.
RepliesCheck = Callable[[bytes, list[bytes]], object]
# done(replies_so_far): True once the message has all its replies.
Done = Callable[[list[bytes]], bool]
# What a request's check says of (sent, replies): None, or the failure.
Judge = Callable[[bytes, list[bytes]], "Exception | None"]

LENGTH = struct.Struct(">I")
ERROR_BIT = 0x80000000  # set in the length word of an error frame, which only the server sends
SIZE_MASK = ERROR_BIT - 1  # the rest of the word is the payload size
# The text of the error frame a draining server sends before it closes a
# connection at a message boundary: every message sent before it was answered
# and none after it was read, so a client may resend those on a new connection.
GOODBYE = b"server shutting down"
# A length above this is taken for a corrupt stream rather than a reply the
# client should wait for; 64 MiB is far above any payload a load test sends.
DEFAULT_MAX_PAYLOAD = 64 << 20


class ProtocolError(Exception):
    """The byte stream from the server cannot be framed; the connection is unusable."""


class WrongReply(Exception):
    """The server answered, but not with what the request expected."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame from the server: a reply payload, or the text of an error frame."""

    payload: bytes
    is_error: bool = False

    @property
    def is_goodbye(self) -> bool:
        """The server's goodbye (see GOODBYE), not a reply to any request."""
        return self.is_error and self.payload == GOODBYE


def encode_frame(payload: bytes) -> bytes:
    """The bytes that carry `payload` as one message."""
    if len(payload) >= ERROR_BIT:
        raise ValueError(f"payload of {len(payload)} bytes does not fit a length frame")
    return LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Turns received bytes into `Frame`s; keeps any incomplete tail for later."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._buffer = bytearray()
        self._start = 0  # bytes at the front of _buffer already consumed

    def receive_data(self, data: bytes) -> None:
        if self._start and self._start * 2 >= len(self._buffer):
            # Compact only once the consumed part dominates, so a burst of
            # small pipelined replies costs one copy, not one per frame.
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def maybe_next_frame(self, size: int | None = None) -> Frame | None:
        """The next complete frame, or None until more data arrives (``size``: unused)."""
        available = len(self._buffer) - self._start
        if available < LENGTH.size:
            return None
        (word,) = LENGTH.unpack_from(self._buffer, self._start)
        size = word & SIZE_MASK
        if size > self._max_payload:
            raise ProtocolError(
                f"frame length {size} exceeds the client limit of {self._max_payload} bytes"
            )
        end = self._start + LENGTH.size + size
        if end > len(self._buffer):
            return None
        payload = bytes(self._buffer[self._start + LENGTH.size : end])
        self._start = end
        return Frame(payload, is_error=bool(word & ERROR_BIT))

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer) - self._start


class Reader(Protocol):
    """What every framing's decoder offers the client."""

    def receive_data(self, data: bytes) -> None: ...

    def maybe_next_frame(self, size: int | None = None) -> Frame | None: ...

    @property
    def buffered(self) -> int: ...


class LineFrameDecoder:
    """``line`` framing: a frame is what comes before the next ``\\n`` (muxsrv appends
    one to every reply; a ``\\r`` before it is the reply's own byte and is kept)."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer known to hold no newline

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def maybe_next_frame(self, size: int | None = None) -> Frame | None:
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buffer)
            if self._scanned > self._max_payload:
                raise ProtocolError(
                    f"line of more than {self._max_payload} bytes exceeds the client limit"
                )
            return None
        payload = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        return Frame(payload)

    @property
    def buffered(self) -> int:
        return len(self._buffer)


class RawStream:
    """``raw`` framing: no boundaries; ``size`` bytes at a time, or all that arrived."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def maybe_next_frame(self, size: int | None = None) -> Frame | None:
        want = len(self._buffer) if size is None else size
        if (size is None and not self._buffer) or len(self._buffer) < want:
            return None
        payload = bytes(self._buffer[:want])
        del self._buffer[:want]
        return Frame(payload)

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def make_decoder(framing: str, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Reader:
    if framing == "length":
        return FrameDecoder(max_payload)
    if framing == "line":
        return LineFrameDecoder(max_payload)
    if framing == "raw":
        return RawStream()
    raise ValueError(f"unknown framing {framing!r}; choose from {', '.join(FRAMINGS)}")


def encode(framing: str, payload: bytes) -> bytes:
    """The bytes that carry ``payload`` as one message in ``framing``."""
    if framing == "length":
        return encode_frame(payload)
    if framing == "line":
        if b"\n" in payload:
            raise ValueError("with line framing a message cannot contain a newline")
        return payload + b"\n"
    if framing == "raw":
        return payload
    raise ValueError(f"unknown framing {framing!r}; choose from {', '.join(FRAMINGS)}")


def parse_target(host: str) -> tuple[str, str, int]:
    """``tcp://HOST:PORT``, ``tls://HOST:PORT`` or ``udp://HOST:PORT`` (also bare
    ``HOST:PORT``, taken as tcp; IPv6 as ``[::1]:PORT``) to (scheme, host, port)."""
    url = urlsplit(host if "://" in host else f"tcp://{host}")
    try:
        port = url.port
    except ValueError:
        port = None
    if (url.scheme not in ("tcp", "tls", "udp") or not url.hostname or port is None
            or url.path not in ("", "/")):
        raise ValueError(f"host {host!r} is not of the form tcp://HOST:PORT, tls://HOST:PORT "
                         "or udp://HOST:PORT")
    return url.scheme, url.hostname, port


def parse_host(host: str) -> tuple[str, int]:
    """(host, port) of ``tcp://``, ``tls://`` or ``udp://HOST:PORT`` (see parse_target)."""
    return parse_target(host)[1:]


def _verdict(check: Callable[..., object], payload: bytes, reply: object) -> Exception | None:
    """The failure a check found, or None if it passed."""
    try:
        verdict = check(payload, reply)
    except Exception as exc:  # whatever a check raises is that request's failure
        return exc
    if verdict is False:
        return WrongReply(f"{getattr(check, '__name__', 'check')} rejected the reply")
    return None


def judge_one(check: Check | None) -> Judge:
    def judge(payload: bytes, replies: list[bytes]) -> Exception | None:
        return None if check is None else _verdict(check, payload, replies[0])

    return judge


def judge_all(check: RepliesCheck | None) -> Judge:
    def judge(payload: bytes, replies: list[bytes]) -> Exception | None:
        return None if check is None else _verdict(check, payload, replies)

    return judge
