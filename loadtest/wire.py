"""The exec handler's reply, as the load test checks it; the framing is muxsrv.wire's.

The client side of the wire protocol (frames in every framing, error frames,
the goodbye) moved into the package as ``muxsrv.wire``, written apart from the
server's codecs so that a load test does not share their bugs; its names are
re-exported here for the locustfiles and the tests.

The exec handler's reply payload is itself structured (a JSON header, then
stdout and stderr); `parse_exec_reply` takes it apart, again without the
server's own decoder (``muxsrv.handlers.exec_protocol``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from muxsrv.wire import (
    DEFAULT_MAX_PAYLOAD,
    ERROR_BIT,
    GOODBYE,
    LENGTH,
    Frame,
    FrameDecoder,
    ProtocolError,
    ServerError,
    WrongReply,
    encode_frame,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "ERROR_BIT",
    "GOODBYE",
    "ExecResult",
    "Frame",
    "FrameDecoder",
    "ProtocolError",
    "ServerError",
    "WrongReply",
    "encode_frame",
    "parse_exec_reply",
]


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
