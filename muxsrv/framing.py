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

A plaintext server's decoder (``make_decoder(..., refuse_tls=True)``) refuses
a stream that opens with a TLS record header (a client that speaks TLS to the
wrong port), with ``error`` saying it "looks like TLS": ``length`` does it in
its oversized-frame branch, for free; ``line`` and ``raw`` start as a subclass
that looks at the stream's first bytes and then turns itself into the plain
class (``__class__``), so no message after them pays anything.  ``raw``
decides on the first chunk alone (any bytes are a raw client's right: only a
chunk that opens with the three bytes of a record header is refused); ``line``
waits for three bytes, which it would hold anyway, before a newline.
"""

from __future__ import annotations

from typing import Final

from .codec import (
    ERROR_FLAG,
    MAX_BATCH,
    MAX_FRAME_LIMIT,
    TLS_ON_PLAINTEXT,
    Buffer,
    Decoder,
    ErrorFrame,
    Failed,
    FramingError,
    ReplyFunction,
    as_payload,
    opens_tls_record,
)
from .length import (
    BODY_BUFFER_MIN,
    TEXT_ON_LENGTH,
    FirstFrameDecoder,
    LengthDecoder,
    encode_error,
    encode_length,
)

__all__ = [
    "BODY_BUFFER_MIN",
    "ENCODERS",
    "ERROR_FLAG",
    "FRAMINGS",
    "MAX_BATCH",
    "MAX_FRAME_LIMIT",
    "TEXT_ON_LENGTH",
    "Buffer",
    "Decoder",
    "ErrorFrame",
    "Failed",
    "FirstFrameDecoder",
    "FramingError",
    "LengthDecoder",
    "LineDecoder",
    "RawDecoder",
    "ReplyFunction",
    "as_payload",
    "encode_error",
    "encode_length",
    "make_decoder",
]

FRAMINGS: Final = ("length", "line", "raw")


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
            if acc:  # (a line begun in an earlier call: once per call at most)
                acc += data[pos:i]
                line = bytes(acc)
                acc.clear()
                self.completions += 1
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


class _TLSRefusingLineDecoder(LineDecoder):
    """A LineDecoder until the stream's first three bytes are known not to open TLS."""

    __slots__ = ()

    def feed(self, data: Buffer) -> list[bytes]:
        if self.error is not None:
            return []
        # Until decided, _acc holds the whole stream so far (under three bytes).
        verdict = opens_tls_record(bytes(self._acc[:3]) + bytes(data[:3]))
        if verdict:
            self.error = TLS_ON_PLAINTEXT
            self._acc.clear()
            return []
        if verdict is False:
            self.__class__ = LineDecoder  # type: ignore[assignment]
        return LineDecoder.feed(self, data)


class _TLSRefusingRawDecoder(RawDecoder):
    """A RawDecoder whose first chunk may not open with a TLS record header."""

    __slots__ = ()

    def feed(self, data: Buffer) -> list[bytes]:
        if self.error is not None:
            return []
        if data:
            if opens_tls_record(bytes(data[:3])):
                self.error = TLS_ON_PLAINTEXT
                return []
            self.__class__ = RawDecoder  # type: ignore[assignment]
        return RawDecoder.feed(self, data)


def make_decoder(framing: str, max_frame: int, *, refuse_tls: bool = False) -> Decoder:
    """A decoder for ``framing``; ``refuse_tls``: a plaintext server's (see above)."""
    if framing == "length":
        return FirstFrameDecoder(max_frame)
    if framing == "line":
        return (_TLSRefusingLineDecoder if refuse_tls else LineDecoder)(max_frame)
    if framing == "raw":
        return (_TLSRefusingRawDecoder if refuse_tls else RawDecoder)(max_frame)
    raise ValueError(f"unknown framing {framing!r}; choose from {', '.join(FRAMINGS)}")


ENCODERS: Final = {"length": encode_length, "line": encode_line, "raw": encode_raw}
