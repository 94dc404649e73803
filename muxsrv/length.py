"""The length framing: a 4-byte big-endian length, then that many payload bytes.

The fast path of muxsrv: ``LengthDecoder`` slices messages straight out of
the received bytes and, for function handlers, fuses decoding, the call and
the reply's encoding into one pass (``respond``).  Its replies are framed by
``encode_length`` alone.  A large body is collected in pieces (see ``want``).
The top bit of the length word marks an error frame, the framing's error
channel (``encode_error``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import repeat
from typing import Any, Final

from .codec import (
    ERROR_FLAG,
    MAX_BATCH,
    MAX_FRAME_LIMIT,
    TLS_ON_PLAINTEXT,
    Buffer,
    Decoder,
    ErrorFrame,
    Failed,
    ReplyFunction,
    _check_size,
    _never_fails,
    as_payload,
)

__all__ = ["BODY_BUFFER_MIN", "TEXT_ON_LENGTH", "TLS_ON_PLAINTEXT", "FirstFrameDecoder",
           "LengthDecoder", "encode_error", "encode_length", "looks_like_text"]

_HEADER: Final = struct.Struct(">I")
_unpack_header = _HEADER.unpack_from
pack_header = _HEADER.pack

#: An unfinished frame at least this large is collected in pieces (``want``,
#: ``body_received``) instead of being re-copied as the tail on every feed, so
#: the tail LengthDecoder keeps is never longer than a header and 4 KiB.
BODY_BUFFER_MIN: Final = 4096
#: The most a tail (a small frame's start) can need to be finished.
_TAIL_JOIN: Final = _HEADER.size + BODY_BUFFER_MIN
#: Replies up to this size are framed as one buffer (header + payload).
_CONCAT_MAX: Final = 4096
#: A length prefix starting 0x16 0x03 is a TLS handshake record (a ClientHello), not a
#: frame of ~370 MB: said so (TLS_ON_PLAINTEXT) when it is refused as oversized (which
#: costs nothing per frame).

#: A connection whose first bytes are text (an HTTP request line, a typed line, telnet's
#: negotiation) read as an oversized length: said so, instead of "frame of 1195725856 bytes".
TEXT_ON_LENGTH: Final = ("this port speaks length-prefixed frames; use --framing line for "
                         "text clients")
#: Bytes a line of text is made of: printable ASCII, tab, CR, LF.
_TEXT: Final = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}

#: The headers of every such reply, packed once: a lookup beats a pack per message.
_HEADERS: Final = tuple(pack_header(n) for n in range(_CONCAT_MAX + 1))

#: Data shorter than this holds at most ``MAX_BATCH`` frames (4 bytes each at least).
_BATCH_BYTES: Final = 4 * MAX_BATCH + 4
#: The loop over frames when there are too few bytes to count them (never ends itself).
_UNCOUNTED: Final = repeat(None)
#: Pieces of a large body smaller than this are gathered into one bytearray
#: (a bytes object per piece costs ~33 bytes each: a body dripped in one byte
#: per segment would cost 30 times its size).
_SMALL_PIECE: Final = 16 * 1024


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

    def discard(self) -> None:
        self._chunks = None
        self._tail = b""
        self.want = 0

    def body_received(self, chunk: bytes) -> bytes | None:
        chunks = self._chunks
        assert chunks is not None and 0 < len(chunk) <= self.want
        _add_piece(chunks, chunk)
        self.want -= len(chunk)
        if self.want:
            return None
        self._chunks = None
        self.completions += 1
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
        joined = tail + data[:k]
        if len(joined) >= 4 and _unpack_header(joined)[0] + 4 <= len(joined):
            self.completions += 1  # the frame held over is finished (once per read at most)
        if not self._frames(joined, 0, fn, out, failed):
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
        last = end - 4  # the last position a header can start at
        # Fewer bytes than _BATCH_BYTES cannot hold a whole batch: no count then.
        for _ in _UNCOUNTED if end < _BATCH_BYTES else repeat(None, MAX_BATCH):
            if pos > last:
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
            elif not self._reply_of(reply, out, failed):
                self._tail = b""
                return False
        else:
            if pos <= last:
                self._tail = data[pos:]
                self.more = True
                return False
        self._tail = data[pos:] if pos < end else b""
        return True

    def _reply_of(self, reply: object, out: list[Any], failed: Failed) -> bool:
        """Frame a reply the inline path does not take; False: the connection ends."""
        if reply is None:
            self.silent += 1
            return True
        n = len(out)
        try:
            encode_length(out, as_payload(reply, returned=True))
        except (TypeError, ValueError) as exc:
            return failed(exc)
        self.extra += len(out) - n - 1
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
                self.error = (TLS_ON_PLAINTEXT if n >> 16 == 0x1603 else
                              f"frame of {n} bytes exceeds the limit of {self.max_frame} bytes")
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



class FirstFrameDecoder(LengthDecoder):
    """A server's :class:`LengthDecoder` until its first length word is read.

    Only the first message of a connection is judged: if its length word is over
    ``max_frame`` and its four bytes look like text (``looks_like_text``: ``GET ``,
    ``POST``, a line typed in telnet or nc), the error is ``TEXT_ON_LENGTH`` instead
    of the oversize one (a TLS ClientHello keeps its own).  A first read of fewer
    than four bytes that is a whole typed line (``a``, Enter) is judged too.  Then
    the decoder becomes a plain :class:`LengthDecoder` (the classes share one
    layout, as ``muxsrv.staged`` does for connections): nothing per message, and
    a later frame with a large length is the normal oversize error.
    """

    __slots__ = ()

    def _cut(self, data: Buffer, fn: ReplyFunction | None, out: list[Any], failed: Failed) -> None:
        head = self._tail + bytes(data[:4])
        if len(head) >= 4:
            self.__class__ = LengthDecoder  # type: ignore[assignment]
            (n,) = _unpack_header(head)
            if n > self.max_frame and n >> 16 != 0x1603 and looks_like_text(head[:4]):
                self.error = TEXT_ON_LENGTH
                self._tail = b""
                return
        elif (head.endswith(b"\n") and looks_like_text(head) and self.error is None
              and int.from_bytes(head.ljust(4, b"\0"), "big") > self.max_frame):
            self.error = TEXT_ON_LENGTH
            self._tail = b""
            return
        LengthDecoder._cut(self, data, fn, out, failed)

    respond = _cut


def looks_like_text(head: bytes) -> bool:
    """The first bytes of a stream are text: ASCII a person or HTTP would send, or telnet."""
    if head[:1] == b"\xff" and head[1:2] in (b"\xfb", b"\xfc", b"\xfd", b"\xfe"):
        return True  # telnet's IAC WILL/WONT/DO/DONT, its option negotiation
    return bool(head) and all(byte in _TEXT for byte in head)


def _add_piece(chunks: list[Any], piece: bytes) -> None:
    """Keep a piece of a large body: small pieces are gathered into one bytearray."""
    if len(piece) >= _SMALL_PIECE:
        chunks.append(piece)
    elif chunks and type(chunks[-1]) is bytearray:
        chunks[-1] += piece
    else:
        chunks.append(bytearray(piece))



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
