"""The simplest built-in handlers, in the function form: one reply per message."""

from __future__ import annotations

__all__ = ["echo", "upper"]


def echo(payload: bytes) -> bytes:
    """Reply with the payload unchanged."""
    return payload


def upper(payload: bytes) -> bytes:
    """Upper-case: Unicode rules for valid UTF-8, ASCII rules for anything else.

    "héllo wörld" -> "HÉLLO WÖRLD"; b"\\xffabc" -> b"\\xffABC".
    """
    if payload.isascii():
        return payload.upper()  # the fast path: bytes.upper is exact for ASCII
    try:
        return payload.decode("utf-8").upper().encode("utf-8")
    except UnicodeDecodeError:
        return payload.upper()
