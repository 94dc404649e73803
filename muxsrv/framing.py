"""Framing: cutting messages out of a TCP byte stream, without any I/O.

TCP delivers a stream of bytes, not messages: one ``recv`` may return half a
message or three and a half ("sticky packets").  A codec turns the stream back
into messages and turns replies into bytes.  Codecs here never touch a socket;
they are fed bytes and return messages, so every property is testable alone.

The receive side is h11's ``receive_data`` shape, bytes in and messages out:

    data = sock.recv(RECV_SIZE)          # the caller's I/O, not ours
    messages = decoder.feed(data)        # every message completed by those bytes

A decoder keeps only the unfinished tail of the stream (at most a header and
a few KiB), so an idle connection owns no receive buffer at all.  Messages are
sliced straight out of the ``bytes`` the caller received: one copy per message
and no shared buffer to manage.  A large frame whose length is known is
collected in pieces instead: the caller may ``recv(want)`` the rest of its body
into fresh bytes and feed them (or hand them to ``body_received``); the pieces
are kept as they are and joined once at the end, so a 64 MiB message arriving
in 64 KiB pieces costs linear time.

When the stream breaks the framing rules, ``feed`` returns the
messages that were complete before the violation and sets ``error``; nothing
after the violation is ever returned.

One call hands out at most ``MAX_BATCH`` messages (a 64 KiB read can hold
16,000 empty frames): the rest of those bytes stay inside the decoder, ``more``
says so, and the caller (which stops reading meanwhile) carries on later with
``feed(b"")``, so one pipelining client cannot hold the loop for long.

Each decoder is also its connection's encoder: ``encode`` frames a reply and
``error_frame`` gives the bytes of an error message, or None where the framing
has no error channel (``line``, ``raw``).  A reply is anything bytes-like;
``as_payload`` turns it into a buffer whose ``len`` is its size in bytes (a
``memoryview`` of 2-byte items is framed by its bytes, not its items).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, Final, TypeAlias

#: What codecs accept as bytes: anything with the buffer protocol we use.
Buffer: TypeAlias = bytes | bytearray | memoryview
#: A function handler: a payload in, a reply (or None: no reply) out.
ReplyFunction: TypeAlias = Callable[[bytes], Buffer | None]
#: Told of a failing handler; False means the connection is ending.
Failed: TypeAlias = Callable[[Exception], bool]

__all__ = [
    "ERROR_FLAG",
    "FRAMINGS",
    "MAX_FRAME_LIMIT",
    "Decoder",
    "ErrorFrame",
    "FramingError",
    "LengthDecoder",
    "LineDecoder",
    "RawDecoder",
    "as_payload",
    "encode_error",
    "make_decoder",
]

_HEADER: Final = struct.Struct(">I")
_unpack_header = _HEADER.unpack_from
pack_header = _HEADER.pack

#: The length word's top bit marks an error frame (server to client only).
ERROR_FLAG: Final = 0x80000000
#: The largest --max-frame: with the top bit reserved, a length word holds 2**31-1.
MAX_FRAME_LIMIT: Final = 0x7FFFFFFF
#: An unfinished frame at least this large is collected in pieces (``want``,
#: ``body_received``) instead of being re-copied as the tail on every feed, so
#: the tail LengthDecoder keeps is never longer than a header and 4 KiB.
BODY_BUFFER_MIN: Final = 4096
#: The most a tail (a small frame's start) can need to be finished.
_TAIL_JOIN: Final = _HEADER.size + BODY_BUFFER_MIN
#: Replies up to this size are framed as one buffer (header + payload).
_CONCAT_MAX: Final = 4096
#: The headers of every such reply, packed once: a lookup beats a pack per message.
_HEADERS: Final = tuple(pack_header(n) for n in range(_CONCAT_MAX + 1))

FRAMINGS: Final = ("length", "line", "raw")
#: Messages one ``feed``/``respond`` call hands out at most (about a millisecond
#: of handler calls); the rest waits inside the decoder (``more``).
MAX_BATCH: Final = 1024
#: Pieces of a large body smaller than this are gathered into one bytearray
#: (a bytes object per piece costs ~33 bytes each: a body dripped in one byte
#: per segment would cost 30 times its size).
_SMALL_PIECE: Final = 16 * 1024


class FramingError(Exception):
    """The peer broke the framing rules; the message says how."""


class ErrorFrame(bytes):
    """An error frame's payload, as a client's decoder returns it (server text, UTF-8)."""

    @property
    def text(self) -> str:
        return self.decode("utf-8", "replace")


class Decoder:
    """Base decoder: byte stream in, list of messages out.  Subclasses fill in."""

    __slots__ = ("error", "max_frame", "more")

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
            return True
        try:
            self.encode(out, as_payload(reply, returned=True))
        except (TypeError, ValueError) as exc:
            return failed(exc)
        return True

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished message."""
        return 0


class LengthDecoder(Decoder):
    """4-byte big-endian length, then that many payload bytes.

    With ``accept_errors`` (clients), a length word with the top bit set yields an
    :class:`ErrorFrame`; without it (servers) such a word is simply too large.
    """

    __slots__ = ("_accept_errors", "_body_error", "_chunks", "_tail", "want")

    framing = "length"

    @staticmethod
    def encode(out: list[Buffer], payload: Buffer) -> None:
        encode_length(out, payload)

    def encode_parts(self, out: list[Buffer], parts: list[Buffer]) -> None:
        encode_length_parts(out, parts)

    @staticmethod
    def error_frame(text: str) -> bytes:
        return encode_error(text)

    def __init__(self, max_frame: int, accept_errors: bool = False) -> None:
        super().__init__(max_frame)
        self._accept_errors = accept_errors
        self._tail = b""
        # A large frame's body, received so far (None: not inside one) ...
        self._chunks: list[bytes] | None = None
        #: ... and how many of its bytes are still to come (0: not inside one).
        #: The caller may then ``recv(want)`` into a fresh bytes object and hand it
        #: to ``body_received``: no buffer to zero, and a body that arrives in one
        #: piece is never copied in user space at all.
        self.want = 0
        self._body_error = False

    @property
    def buffered(self) -> int:
        if self._chunks is not None:
            # The header was consumed to size the body; it is part of what is held.
            return _HEADER.size + sum(map(len, self._chunks))
        return len(self._tail)

    def body_received(self, chunk: bytes) -> bytes | None:
        chunks = self._chunks
        assert chunks is not None and 0 < len(chunk) <= self.want
        _add_piece(chunks, chunk)
        self.want -= len(chunk)
        if self.want:
            return None
        self._chunks = None
        message = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if type(message) is not bytes:
            message = bytes(message)
        return ErrorFrame(message) if self._body_error else message

    def feed(self, data: Buffer) -> list[bytes]:
        out: list[bytes] = []
        self._cut(data, None, out, _never_fails)
        return out

    def _cut(self, data: Buffer, fn: ReplyFunction | None, out: list[Any], failed: Failed) -> None:
        """Cut frames; with ``fn``, reply to each at once (the hot path, kept inline)."""
        if self.error is not None:
            return  # nothing after a violation, ever
        if type(data) is not bytes:
            data = bytes(data)  # slices of bytes are the payloads handed out
        if self.more:
            self.more = False  # what is left of the last batch is the tail: go on with it
        if self._chunks is not None:
            if not data:
                return
            data = self._finish_body(data, fn, out, failed)
            if not data:
                return
        pos = 0
        if self._tail:
            pos = self._finish_tail(data, fn, out, failed)
            if pos < 0:
                return
        if self._chunks is None:
            self._frames(data, pos, fn, out, failed)
        elif pos < len(data):  # the tail's header began a large frame
            self._cut(data[pos:], fn, out, failed)

    respond = _cut  # (the per-recv hot path: no extra call)

    def _finish_tail(
        self, data: bytes, fn: ReplyFunction | None, out: list[Any], failed: Failed
    ) -> int:
        """Finish the frame the tail began with the front of ``data``; where cutting goes on.

        The tail is the start of a small frame (a large one is collected in
        pieces), so the frame ends within the first ``_TAIL_JOIN`` bytes of
        ``data``: only those are joined to it, never all of ``data``.  -1: there
        is nothing more to cut now (all of ``data`` was used, or cutting stopped).
        """
        k = min(len(data), _TAIL_JOIN)
        tail, self._tail = self._tail, b""
        if not self._frames(tail + data[:k], 0, fn, out, failed):
            if self.more:  # the batch is full: all the rest waits as the tail
                self._tail += data[k:]
            return -1
        if k == len(data):
            return -1
        # An unfinished frame left over lies wholly in data[:k]: cut it again from there.
        left, self._tail = len(self._tail), b""
        return k - left

    def _frames(
        self, data: bytes, pos: int, fn: ReplyFunction | None, out: list[Any], failed: Failed
    ) -> bool:
        """Cut every frame from ``pos`` on; keep an unfinished small one as the tail.

        False: cutting stopped (the stream broke the rules, the connection ends,
        or ``MAX_BATCH`` messages were cut: ``more`` is set and the rest is the tail).
        """
        end = len(data)
        limit = self.max_frame
        unpack = _unpack_header
        headers = _HEADERS
        for _ in repeat(None, MAX_BATCH):
            if end - pos < 4:
                break
            (n,) = unpack(data, pos)
            start = pos + 4
            stop = start + n
            if n > limit or stop > end:
                new = self._unusual(data, pos, end, n, out)
                if new < 0:
                    return False
                whole_error_frame = new != pos and self._chunks is None
                pos = new
                if whole_error_frame:
                    continue  # (clients only) go on with the next frame
                break
            pos = stop
            if fn is None:
                out.append(data[start:stop])
                continue
            # reply()'s common case inline (this runs once per message): a small
            # bytes reply framed as encode_length frames it; all else goes there.
            try:
                reply = fn(data[start:stop])
            except Exception as exc:
                if failed(exc):
                    continue
                self._tail = b""
                return False
            if type(reply) is bytes and (m := len(reply)) <= _CONCAT_MAX:
                out.append(headers[m] + reply)
            elif reply is not None and not self._reply_of(reply, out, failed):
                self._tail = b""
                return False
        else:
            if end - pos >= 4:
                self._tail = data[pos:]
                self.more = True
                return False
        self._tail = data[pos:] if pos < end else b""
        return True

    def _reply_of(self, reply: object, out: list[Any], failed: Failed) -> bool:
        """Frame a reply the inline path does not take; False: the connection ends."""
        try:
            encode_length(out, as_payload(reply, returned=True))
        except (TypeError, ValueError) as exc:
            return failed(exc)
        return True

    def _finish_body(
        self, data: bytes, fn: ReplyFunction | None, out: list[Any], failed: Failed
    ) -> bytes:
        """Inside a large frame: its body takes what it still wants of ``data``; the rest back."""
        take = min(self.want, len(data))
        message = self.body_received(data[:take])
        if message is None:
            pass
        elif fn is None or isinstance(message, ErrorFrame):
            out.append(message)
        elif not self.reply(fn, message, out, failed):
            return b""
        return data[take:]

    def _unusual(self, buf: bytes, pos: int, end: int, n: int, out: list[Any]) -> int:
        """A frame that is too large, an error frame, or unfinished; the new position.

        -1: the stream broke the rules (``error`` is set).
        """
        start = pos + 4
        is_error = False
        if n > self.max_frame:
            flagged = n ^ ERROR_FLAG
            if not (self._accept_errors and n & ERROR_FLAG and flagged <= self.max_frame):
                self.error = f"frame of {n} bytes exceeds the limit of {self.max_frame} bytes"
                self._tail = b""
                return -1
            n = flagged
            is_error = True
            if start + n <= end:
                out.append(ErrorFrame(buf[start : start + n]))
                return start + n
        if n >= BODY_BUFFER_MIN:  # unfinished and large: collect the body in pieces
            self._chunks = []
            if end > start:
                _add_piece(self._chunks, buf[start:end])
            self.want = n - (end - start)
            self._body_error = is_error
            return end
        return pos  # unfinished and small: kept as the tail


def _never_fails(exc: Exception) -> bool:
    raise AssertionError("no handler runs while only cutting messages") from exc


def _add_piece(chunks: list[Any], piece: bytes) -> None:
    """Keep a piece of a large body: small pieces are gathered into one bytearray."""
    if len(piece) >= _SMALL_PIECE:
        chunks.append(piece)
    elif chunks and type(chunks[-1]) is bytearray:
        chunks[-1] += piece
    else:
        chunks.append(bytearray(piece))


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


def encode_length(out: list[Buffer], payload: Buffer) -> None:
    """Append one length-prefixed frame to ``out`` (a large payload is not copied)."""
    n = len(payload)
    if n <= _CONCAT_MAX:
        out.append(_HEADERS[n] + payload)  # one buffer: the flush needs no join
    else:
        _check_size(n)
        out.append(pack_header(n))
        out.append(payload)


def encode_length_parts(out: list[Buffer], parts: Sequence[Buffer]) -> None:
    """One length-prefixed frame gathered from several buffers, queued as they are."""
    kept = [part for part in parts if len(part)]
    size = sum(map(len, kept))
    _check_size(size)
    out.append(pack_header(size))
    out += kept


def encode_error(text: str, max_frame: int = MAX_FRAME_LIMIT) -> bytes:
    """One error frame carrying ``text`` (cut to fit, UTF-8)."""
    data = text.encode("utf-8", "replace")[: min(max_frame, 4096)]
    return pack_header(ERROR_FLAG | len(data)) + data


class LineDecoder(Decoder):
    """Messages end with ``\\n`` or ``\\r\\n``; neither is part of the payload."""

    __slots__ = ("_acc", "_rest")

    framing = "line"

    @staticmethod
    def encode(out: list[Buffer], payload: Buffer) -> None:
        encode_line(out, payload)

    def __init__(self, max_frame: int) -> None:
        super().__init__(max_frame)
        self._acc = bytearray()
        self._rest = b""  # bytes not yet looked at when a batch filled up

    @property
    def buffered(self) -> int:
        return len(self._acc) + len(self._rest)

    def feed(self, data: Buffer) -> list[bytes]:
        if self.error is not None:
            return []  # nothing after a violation, ever
        if type(data) is not bytes:
            data = bytes(data)
        if self.more:
            data, self._rest, self.more = self._rest + data, b"", False
        out: list[bytes] = []
        pos = 0
        end = len(data)
        find = data.find
        acc = self._acc
        limit = self.max_frame
        while True:
            i = find(b"\n", pos)
            if i < 0:
                break
            if len(out) == MAX_BATCH:
                self._rest = data[pos:]
                self.more = True
                return out
            if acc:
                acc += data[pos:i]
                line = bytes(acc)
                acc.clear()
            else:
                line = data[pos:i]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self.error = f"line of {len(line)} bytes exceeds the limit of {limit} bytes"
                return out
            out.append(line)
            pos = i + 1
        if pos < end:
            acc += data[pos:]
            # A trailing "\r" may still be followed by "\n": allow one byte over.
            if len(acc) > limit + 1:
                self.error = f"line of more than {limit} bytes exceeds the limit"
                acc.clear()
        return out

    def eof(self) -> list[bytes]:
        assert not self.more, "feed(b'') until more is False before eof()"
        if not self._acc or self.error is not None:
            return []
        line = bytes(self._acc)
        self._acc.clear()
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_frame:
            # _acc may hold one byte over the limit, waiting for a "\n" after a "\r".
            self.error = f"line of {len(line)} bytes exceeds the limit of {self.max_frame} bytes"
            return []
        return [line]


def encode_line(out: list[Buffer], payload: Buffer) -> None:
    out.append(payload)
    out.append(b"\n")


class RawDecoder(Decoder):
    """No framing: every chunk a ``recv`` returns is one message."""

    __slots__ = ("_rest",)

    framing = "raw"

    @staticmethod
    def encode(out: list[Buffer], payload: Buffer) -> None:
        encode_raw(out, payload)

    def __init__(self, max_frame: int) -> None:
        super().__init__(max_frame)
        self._rest = b""  # bytes not yet handed out when a batch filled up

    @property
    def buffered(self) -> int:
        return len(self._rest)

    def feed(self, data: Buffer) -> list[bytes]:
        if type(data) is not bytes:
            data = bytes(data)
        if self.more:
            data, self._rest, self.more = self._rest + data, b"", False
        size = self.max_frame
        if len(data) <= size:
            return [data] if data else []
        batch = size * MAX_BATCH
        if len(data) > batch:
            data, self._rest, self.more = data[:batch], data[batch:], True
        return [data[i : i + size] for i in range(0, len(data), size)]


def encode_raw(out: list[Buffer], payload: Buffer) -> None:
    out.append(payload)


def make_decoder(framing: str, max_frame: int) -> Decoder:
    if framing == "length":
        return LengthDecoder(max_frame)
    if framing == "line":
        return LineDecoder(max_frame)
    if framing == "raw":
        return RawDecoder(max_frame)
    raise ValueError(f"unknown framing {framing!r}; choose from {', '.join(FRAMINGS)}")


ENCODERS: Final = {"length": encode_length, "line": encode_line, "raw": encode_raw}
