"""The muxsrv wire protocol as a load generator sees it: bytes in, frames out.

Like the server's own codecs this module is sans-IO: it never touches a socket,
so every rule in it can be tested with plain bytes and nothing here imports
Locust or gevent (importing Locust monkey-patches the whole process).

The `length` framing: each message is a 4-byte unsigned big-endian length N,
then N payload bytes; N = 0 is legal.  A length word with the top bit set is
an *error frame*, which only the server sends: the low 31 bits count bytes of
UTF-8 text saying what went wrong (`GOODBYE`: the server is shutting down,
and what it did not answer may be resent).  A client feeds whatever it
received to `FrameDecoder.receive_data` and calls `maybe_next_frame` until it
returns None.

It is deliberately independent of ``muxsrv.framing``: a load test that checked
replies with the server's own codec would share that codec's bugs.

The exec handler's reply payload is itself structured (a JSON header, then
stdout and stderr); `parse_exec_reply` takes it apart.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

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


class ServerError(Exception):
    """The server answered a request with an error frame; the text is its message."""


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

    def maybe_next_frame(self) -> Frame | None:
        """The next complete frame, or None until more data arrives."""
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


@dataclass(frozen=True, slots=True)
class ExecResult:
    """A decoded reply of the exec handler."""

    exit_code: int
    timed_out: bool
    truncated: bool
    stdout: bytes
    stderr: bytes


_EXEC_INT_KEYS = ("exit_code", "stdout", "stderr")
_EXEC_BOOL_KEYS = ("timed_out", "truncated")


def parse_exec_reply(reply: bytes) -> ExecResult:
    """Split an exec reply (header length, JSON header, stdout, stderr); WrongReply if malformed."""
    if len(reply) < LENGTH.size:
        raise WrongReply(f"exec reply of {len(reply)} bytes has no header length")
    (header_len,) = LENGTH.unpack_from(reply)
    body = LENGTH.size + header_len
    if body > len(reply):
        raise WrongReply(f"exec header length {header_len} runs past the reply")
    try:
        header = json.loads(reply[LENGTH.size : body].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WrongReply(f"exec header is not UTF-8 JSON: {exc.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise WrongReply("exec header is not a JSON object")
    for key in _EXEC_INT_KEYS:
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise WrongReply(f"exec header {key!r} is not an integer")
    for key in _EXEC_BOOL_KEYS:
        if not isinstance(header.get(key), bool):
            raise WrongReply(f"exec header {key!r} is not a boolean")
    n_out, n_err = header["stdout"], header["stderr"]
    if n_out < 0 or n_err < 0 or body + n_out + n_err != len(reply):
        raise WrongReply(
            f"exec header counts stdout={n_out} stderr={n_err} bytes "
            f"but {len(reply) - body} follow it"
        )
    return ExecResult(
        exit_code=header["exit_code"],
        timed_out=header["timed_out"],
        truncated=header["truncated"],
        stdout=reply[body : body + n_out],
        stderr=reply[body + n_out :],
    )
