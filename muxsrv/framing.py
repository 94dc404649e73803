"""Framing: cutting messages out of a TCP byte stream, without any I/O.

TCP delivers a stream of bytes, not messages: one ``recv`` may return half a
message or three and a half ("sticky packets").  A codec turns the stream back
into messages and turns replies into bytes.  Codecs here never touch a socket;
they are fed bytes and return messages, so every property is testable alone.

The receive side follows asyncio's ``BufferedProtocol`` shape so that bytes are
copied as few times as possible:

    buf = decoder.get_buffer(scratch)    # where the next recv_into may write
    n = sock.recv_into(buf)              # the caller's I/O, not ours
    messages = decoder.buffer_updated(n) # every message completed by those n bytes

``scratch`` is one large buffer shared by every connection of a loop (the loop
is single-threaded), so an idle connection owns no receive buffer at all.  A
decoder keeps only the unfinished tail of the stream; a large frame whose
length is known gets a buffer of its own, sized from its header, and the rest
of its body is received straight into it, so a 64 MiB message arriving in 64
KiB pieces costs linear time.  ``feed(data)`` is the same for tests and
clients that already hold bytes.

When the stream breaks the framing rules, ``buffer_updated`` returns the
messages that were complete before the violation and sets ``error``; nothing
after the violation is ever returned.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
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
#: An unfinished frame at least this large gets a buffer of its own, so its body
#: is received in place instead of being re-copied on every recv.
BODY_BUFFER_MIN: Final = 4096
#: The longest unfinished tail LengthDecoder copies into scratch: a header and
#: a body shorter than BODY_BUFFER_MIN.  Scratch must be larger than this.
TAIL_MAX: Final = _HEADER.size + BODY_BUFFER_MIN

#: Frames up to this size are copied out of a bytearray by slicing (two small
#: copies beat a memoryview's object overhead); larger ones through a memoryview.
_SLICE_COPY_MAX: Final = 1024
#: Replies up to this size are framed as one buffer (header + payload).
_CONCAT_MAX: Final = 4096

FRAMINGS: Final = ("length", "line", "raw")


class FramingError(Exception):
    """The peer broke the framing rules; the message says how."""


class ErrorFrame(bytes):
    """An error frame's payload, as a client's decoder returns it (server text, UTF-8)."""

    @property
    def text(self) -> str:
        return self.decode("utf-8", "replace")


class Decoder:
    """Base decoder: byte stream in, list of messages out.  Subclasses fill in."""

    __slots__ = ("_scratch", "error", "max_frame")

    #: Bytes of a large message still to come that may be read with ``recv(want)``
    #: and given to ``body_received`` instead of going through ``get_buffer``.
    want: int = 0

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.error: str | None = None
        self._scratch: bytearray | None = None

    def body_received(self, chunk: bytes) -> bytes | None:
        """At most ``want`` bytes of a large message; the message once it is whole."""
        raise NotImplementedError

    def get_buffer(self, scratch: bytearray) -> Buffer:
        """Return the writable buffer the next ``recv_into`` should fill."""
        raise NotImplementedError

    def buffer_updated(self, nbytes: int) -> list[bytes]:
        """``nbytes`` were written at the start of the last ``get_buffer``; cut messages."""
        raise NotImplementedError

    def eof(self) -> list[bytes]:
        """The peer sent EOF: return any final message (only ``line`` has one)."""
        return []

    @staticmethod
    def encode(out: list[Buffer], payload: Buffer) -> None:
        """Append the framed ``payload`` to ``out``."""
        raise NotImplementedError

    def respond(self, nbytes: int, fn: ReplyFunction, out: list[Buffer], failed: Failed) -> None:
        """``buffer_updated``, then ``fn`` on each message, each reply encoded into ``out``.

        The function handler's whole path in one call: codecs may fuse the
        three steps (``LengthDecoder`` does).  When ``fn`` raises, or returns
        something that is not bytes, ``failed(exc)`` is told; if it returns
        False the connection is ending and nothing more is done.
        """
        for payload in self.buffer_updated(nbytes):
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
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            return failed(_wrong_type(reply))
        self.encode(out, reply)
        return True

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished message."""
        return 0

    def feed(self, data: Buffer) -> list[bytes]:
        """Convenience for callers holding bytes: the same as a recv_into of ``data``."""
        view = memoryview(data).cast("B")
        out: list[bytes] = []
        # Room for the unfinished tail a decoder copies to the front of scratch
        # (LengthDecoder), or a byte-at-a-time feed never gets a byte in.
        scratch = bytearray(len(view) + TAIL_MAX)
        while view and self.error is None:
            buf = memoryview(self.get_buffer(scratch)).cast("B")
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            out += self.buffer_updated(n)
        return out


class LengthDecoder(Decoder):
    """4-byte big-endian length, then that many payload bytes.

    With ``accept_errors`` (clients), a length word with the top bit set yields an
    :class:`ErrorFrame`; without it (servers) such a word is simply too large.
    """

    __slots__ = ("_accept_errors", "_body_error", "_chunks", "_tail", "want")

    @staticmethod
    def encode(out: list[Buffer], payload: Buffer) -> None:
        encode_length(out, payload)

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

    def get_buffer(self, scratch: bytearray) -> Buffer:
        self._scratch = scratch
        if self._chunks is not None:
            return memoryview(scratch)[: min(self.want, len(scratch))]
        tail = self._tail
        if not tail:
            return scratch
        t = len(tail)
        scratch[:t] = tail
        return memoryview(scratch)[t:]

    def body_received(self, chunk: bytes) -> bytes | None:
        chunks = self._chunks
        assert chunks is not None and 0 < len(chunk) <= self.want
        chunks.append(chunk)
        self.want -= len(chunk)
        if self.want:
            return None
        self._chunks = None
        message = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return ErrorFrame(message) if self._body_error else message

    def buffer_updated(self, nbytes: int) -> list[bytes]:
        out: list[bytes] = []
        self._cut(nbytes, None, out, _never_fails)
        return out

    def respond(self, nbytes: int, fn: ReplyFunction, out: list[Buffer], failed: Failed) -> None:
        self._cut(nbytes, fn, out, failed)

    def _cut(
        self, nbytes: int, fn: ReplyFunction | None, out: list[Any], failed: Failed
    ) -> None:
        """Cut frames; with ``fn``, reply to each at once (the hot path, kept inline)."""
        buf = self._scratch
        assert buf is not None
        if self._chunks is not None:
            message = self.body_received(bytes(buf[:nbytes]))
            if message is None:
                pass
            elif fn is None or isinstance(message, ErrorFrame):
                out.append(message)
            else:
                self.reply(fn, message, out, failed)
            return
        tail = self._tail
        end = len(tail) + nbytes if tail else nbytes
        pos = 0
        limit = self.max_frame
        unpack = _unpack_header
        while end - pos >= 4:
            (n,) = unpack(buf, pos)
            start = pos + 4
            stop = start + n
            if n > limit or stop > end:
                new = self._unusual(buf, pos, end, n, out)
                if new < 0:
                    return
                whole_error_frame = new != pos and self._chunks is None
                pos = new
                if whole_error_frame:
                    continue  # (clients only) go on with the next frame
                break
            pos = stop
            if n <= _SLICE_COPY_MAX:
                payload = bytes(buf[start:stop])
            else:
                payload = memoryview(buf)[start:stop].tobytes()
            if fn is None:
                out.append(payload)
                continue
            # Inline copy of reply() and encode_length(): this runs once per message.
            try:
                reply = fn(payload)
            except Exception as exc:
                if failed(exc):
                    continue
                self._tail = b""
                return
            if reply is None:
                continue
            try:
                m = len(reply)
                if m <= _CONCAT_MAX:
                    out.append(pack_header(m) + reply)  # TypeError unless bytes-like
                elif isinstance(reply, (bytes, bytearray, memoryview)):
                    out.append(pack_header(m))
                    out.append(reply)
                else:
                    raise TypeError
            except TypeError:
                if failed(_wrong_type(reply)):
                    continue
                self._tail = b""
                return
        self._tail = bytes(buf[pos:end]) if pos < end else b""

    def _unusual(self, buf: bytearray, pos: int, end: int, n: int, out: list[Any]) -> int:
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
            self._chunks = [bytes(buf[start:end])] if end > start else []
            self.want = n - (end - start)
            self._body_error = is_error
            return end
        return pos  # unfinished and small: kept as the tail


def _never_fails(exc: Exception) -> bool:
    raise AssertionError("no handler runs while only cutting messages") from exc


def _wrong_type(reply: object) -> TypeError:
    return TypeError(f"handler returned {type(reply).__name__}; expected bytes or None")


def encode_length(out: list[Buffer], payload: Buffer) -> None:
    """Append one length-prefixed frame to ``out`` (a large payload is not copied)."""
    n = len(payload)
    if n <= _CONCAT_MAX:
        out.append(pack_header(n) + payload)  # one buffer: the flush needs no join
    else:
        out.append(pack_header(n))
        out.append(payload)


def encode_length_parts(out: list[Buffer], parts: tuple[Buffer, ...]) -> None:
    """One length-prefixed frame gathered from several buffers, queued as they are."""
    kept = [part for part in parts if len(part)]
    size = sum(map(len, kept))
    if size > MAX_FRAME_LIMIT:
        raise ValueError(f"a message of {size} bytes does not fit a length frame")
    out.append(pack_header(size))
    out += kept


def encode_error(text: str, max_frame: int = MAX_FRAME_LIMIT) -> bytes:
    """One error frame carrying ``text`` (cut to fit, UTF-8)."""
    data = text.encode("utf-8", "replace")[: min(max_frame, 4096)]
    return pack_header(ERROR_FLAG | len(data)) + data


class LineDecoder(Decoder):
    """Messages end with ``\\n`` or ``\\r\\n``; neither is part of the payload."""

    __slots__ = ("_acc",)

    @staticmethod
    def encode(out: list[Buffer], payload: Buffer) -> None:
        encode_line(out, payload)

    def __init__(self, max_frame: int) -> None:
        super().__init__(max_frame)
        self._acc = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._acc)

    def get_buffer(self, scratch: bytearray) -> Buffer:
        self._scratch = scratch
        return scratch

    def buffer_updated(self, nbytes: int) -> list[bytes]:
        buf = self._scratch
        assert buf is not None
        out: list[bytes] = []
        pos = 0
        find = buf.find
        acc = self._acc
        limit = self.max_frame
        while True:
            i = find(b"\n", pos, nbytes)
            if i < 0:
                break
            if acc:
                acc += buf[pos:i]
                line = bytes(acc)
                acc.clear()
            else:
                line = bytes(buf[pos:i])
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self.error = f"line of {len(line)} bytes exceeds the limit of {limit} bytes"
                return out
            out.append(line)
            pos = i + 1
        if pos < nbytes:
            acc += buf[pos:nbytes]
            # A trailing "\r" may still be followed by "\n": allow one byte over.
            if len(acc) > limit + 1:
                self.error = f"line of more than {limit} bytes exceeds the limit"
                acc.clear()
        return out

    def eof(self) -> list[bytes]:
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

    __slots__ = ()

    @staticmethod
    def encode(out: list[Buffer], payload: Buffer) -> None:
        encode_raw(out, payload)

    def get_buffer(self, scratch: bytearray) -> Buffer:
        self._scratch = scratch
        if len(scratch) > self.max_frame:
            return memoryview(scratch)[: self.max_frame]
        return scratch

    def buffer_updated(self, nbytes: int) -> list[bytes]:
        assert self._scratch is not None
        return [bytes(memoryview(self._scratch)[:nbytes])]


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
