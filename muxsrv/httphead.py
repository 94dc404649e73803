"""A tiny sans-IO HTTP/1.x request-head reader for the admin listener: bytes in, a verdict out.

Only what an admin port needs: the request line and the headers up to the
empty line, bounded (``MAX_HEAD`` bytes, ``MAX_HEADERS`` lines); no body, no
keep-alive, no chunked requests.  ``feed`` returns None while the head is
unfinished, else a :class:`Request` or a :class:`BadRequest` whose ``status``
is the answer to give (400, 405, 414/431 as 431, 505) before closing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = ["MAX_HEAD", "BadRequest", "HeadReader", "Request", "response"]

#: The largest request head taken (request line and headers); more: refused, closed.
MAX_HEAD: Final = 8 * 1024
#: Header lines taken at most.
MAX_HEADERS: Final = 64

REASONS: Final = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                  405: "Method Not Allowed", 408: "Request Timeout",
                  431: "Request Header Fields Too Large", 503: "Service Unavailable",
                  505: "HTTP Version Not Supported"}


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class BadRequest:
    status: int
    why: str


class HeadReader:
    """Collects a request head; ``feed(data)`` until it returns something."""

    __slots__ = ("_buf", "done")

    def __init__(self) -> None:
        self._buf = b""
        self.done = False

    def feed(self, data: bytes) -> Request | BadRequest | None:
        if self.done:
            return None
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        size = 4
        if end < 0:
            end = buf.find(b"\n\n")  # (a bare-LF client, as nc sends)
            size = 2
        if end < 0:
            if len(buf) > MAX_HEAD:
                self.done = True
                return BadRequest(431, f"request head over {MAX_HEAD} bytes")
            self._buf = buf
            return None
        self.done = True
        self._buf = b""
        if end + size > MAX_HEAD:
            return BadRequest(431, f"request head over {MAX_HEAD} bytes")
        return _parse(buf[:end])


def _parse(head: bytes) -> Request | BadRequest:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # (latin-1 decodes anything; kept for clarity)
        return BadRequest(400, "undecodable head")
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1].startswith("/"):
        return BadRequest(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        return BadRequest(505, "not HTTP/1.x")
    if len(lines) - 1 > MAX_HEADERS:
        return BadRequest(431, "too many header lines")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    path, _, query = target.partition("?")
    return Request(method, path, query, headers)


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.0 response (the connection closes after it)."""
    head = [f"HTTP/1.0 {status} {REASONS.get(status, 'Error')}",
            f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
            "Connection: close", "Cache-Control: no-store",
            *(f"{name}: {value}" for name, value in extra)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
