"""The exec handler's wire format and command parsing, without any I/O.

A request's payload is a command line.  Its reply is one message::

    H (4 bytes, unsigned big-endian) | H bytes of UTF-8 JSON | stdout bytes | stderr bytes

The JSON object has exactly the keys ``exit_code`` (int; -N: killed by signal
N, as ``Popen.returncode``), ``stdout`` and ``stderr`` (how many bytes of each
follow), ``timed_out`` and ``truncated`` (bools).  Output is never decoded.

The server builds a reply from :class:`OutputBuffer` blocks and sends header
and blocks as one gathered message, so output is never copied into a reply
buffer; clients call :func:`decode_reply`.
"""

from __future__ import annotations

import json
import os
import shlex
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ExecResult",
    "OutputBuffer",
    "Refused",
    "ReplyError",
    "command_argv",
    "decode_reply",
    "encode_header",
    "encode_reply",
]

_LENGTH: Final = struct.Struct(">I")
_KEYS: Final = ("exit_code", "stdout", "stderr", "timed_out", "truncated")
#: A reply header is a few dozen bytes; anything this large is not one.
MAX_HEADER: Final = 4096
#: ``sh -c`` runs the command line in shell mode.
SHELL: Final = "/bin/sh"
#: Exit statuses of commands that were not run, as a shell reports them.
NOT_FOUND: Final = 127
CANNOT_EXECUTE: Final = 126


class ReplyError(ValueError):
    """A reply that does not follow the exec wire format."""


class Refused(Exception):
    """A command line that will not be run; the message goes to the client's stderr."""


@dataclass(frozen=True)
class ExecResult:
    """What a command did, as a client sees it."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    truncated: bool = False

    @property
    def status(self) -> int:
        """A shell's exit status for it: 124 if timed out (as timeout(1)), 128+N if killed."""
        if self.timed_out:
            return 124
        if self.exit_code < 0:
            return 128 - self.exit_code
        return self.exit_code


def encode_header(
    exit_code: int, stdout: int, stderr: int, timed_out: bool, truncated: bool
) -> bytes:
    """The reply's first part: H and the JSON header (the output bytes follow it)."""
    header = json.dumps(
        {"exit_code": exit_code, "stdout": stdout, "stderr": stderr,
         "timed_out": timed_out, "truncated": truncated},
        separators=(",", ":"),
    ).encode("utf-8")
    return _LENGTH.pack(len(header)) + header


def encode_reply(result: ExecResult) -> bytes:
    """A whole reply in one buffer (for small replies: refusals, tests)."""
    head = encode_header(result.exit_code, len(result.stdout), len(result.stderr),
                         result.timed_out, result.truncated)
    return head + result.stdout + result.stderr


def decode_reply(payload: bytes) -> ExecResult:
    """Parse one reply; :class:`ReplyError` says what is wrong with a bad one."""
    if len(payload) < _LENGTH.size:
        raise ReplyError(f"reply of {len(payload)} bytes has no header length")
    (size,) = _LENGTH.unpack_from(payload)
    end = _LENGTH.size + size
    if size > MAX_HEADER or end > len(payload):
        raise ReplyError(f"header length {size} does not fit a reply of {len(payload)} bytes")
    try:
        header = json.loads(payload[_LENGTH.size : end].decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both are
        raise ReplyError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict) or not all(key in header for key in _KEYS):
        raise ReplyError(f"header lacks one of {', '.join(_KEYS)}: {header!r}")
    exit_code, n_out, n_err = header["exit_code"], header["stdout"], header["stderr"]
    ints = (exit_code, n_out, n_err)
    if not all(type(v) is int for v in ints) or n_out < 0 or n_err < 0:
        raise ReplyError(f"exit_code, stdout and stderr must be whole numbers: {header!r}")
    if not all(type(header[k]) is bool for k in ("timed_out", "truncated")):
        raise ReplyError(f"timed_out and truncated must be true or false: {header!r}")
    if end + n_out + n_err != len(payload):
        raise ReplyError(
            f"header announces {n_out}+{n_err} output bytes; {len(payload) - end} follow"
        )
    return ExecResult(
        exit_code, payload[end : end + n_out], payload[end + n_out :],
        header["timed_out"], header["truncated"],
    )


# -- commands ------------------------------------------------------------------


def command_argv(payload: bytes, allowed: Collection[str] | None) -> list[bytes] | list[str]:
    """The argv to run for a command line, or :class:`Refused`.

    Without an allowlist: ``/bin/sh -c LINE``, the bytes as they came.  With
    one: the line split as a POSIX shell would split words (``shlex``), run
    without a shell, and only if its program, exactly as written, is allowed.
    """
    if b"\0" in payload:
        raise Refused("the command contains a NUL byte")
    if allowed is None:
        return [SHELL.encode(), b"-c", payload]
    line = os.fsdecode(payload)  # surrogateescape: arguments keep their exact bytes
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise Refused(f"cannot split the command into words: {exc}") from None
    if not argv:
        raise Refused("empty command")
    if argv[0] not in allowed:
        raise Refused(
            f"{argv[0]!r} is not an allowed program on this server (see --exec-allow)"
        )
    return argv


# -- output --------------------------------------------------------------------

#: First block of an output buffer, so a one-line answer costs one small block ...
BLOCK_MIN: Final = 4096
#: ... and the largest: blocks double up to this, so 8 MiB is 33 blocks.
BLOCK_MAX: Final = 256 * 1024


class OutputBuffer:
    """The bytes read from one pipe, in blocks that are filled in place.

    The BufferedProtocol shape: ``get_buffer(limit)`` hands out writable space
    (at most ``limit`` bytes) for the next ``readv``, ``buffer_updated(n)``
    records what was written there.  Growing never copies what was already
    read, and a block is never larger than the room the caller allows, so the
    memory held is the output plus at most one partly filled block.
    """

    __slots__ = ("_blocks", "_used", "size")

    def __init__(self) -> None:
        self._blocks: list[bytearray] = []
        self._used = 0  # bytes filled in the last block
        self.size = 0

    def get_buffer(self, limit: int) -> memoryview:
        if limit < 1:
            raise ValueError("get_buffer needs a limit of at least one byte")
        blocks = self._blocks
        if not blocks or self._used == len(blocks[-1]):
            blocks.append(bytearray(min(max(BLOCK_MIN, self.size), BLOCK_MAX, limit)))
            self._used = 0
        last = blocks[-1]
        return memoryview(last)[self._used : min(len(last), self._used + limit)]

    def buffer_updated(self, nbytes: int) -> None:
        self._used += nbytes
        self.size += nbytes

    def parts(self) -> list[memoryview | bytearray]:
        """The bytes held, as buffers in order (none of them copied)."""
        blocks: list[memoryview | bytearray] = list(self._blocks)
        if blocks and self._used < len(self._blocks[-1]):
            blocks[-1] = memoryview(self._blocks[-1])[: self._used]
        return [b for b in blocks if len(b)]

    def getvalue(self) -> bytes:
        return b"".join(self.parts())
