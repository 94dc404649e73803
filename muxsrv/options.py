"""Argparse types shared by the command line and by handlers' own options.

A handler that declares ``--NAME-...`` options (``Handler.add_arguments``)
uses these instead of reaching into ``cli``: importing this module pulls in
nothing of the server.  Each type raises ``argparse.ArgumentTypeError`` with a
message that reads well after ``argument --flag:``.  ``program_version`` is
what ``--version`` prints, for the server's and the client's command lines.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from importlib import metadata
from typing import Any

from . import __version__
from .framing import MAX_FRAME_LIMIT

__all__ = [
    "max_frame",
    "options_in_force",
    "parse_size",
    "positive_int",
    "positive_seconds",
    "program_version",
    "seconds",
    "size_or_zero",
    "whole_number",
]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes, with an optional K, M or G suffix (powers of 1024): ``16M``."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in ("k", "m", "g") else ""
    try:
        value = int(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}") from None
    return value


def max_frame(text: str) -> int:
    value = parse_size(text)
    if not 1 <= value <= MAX_FRAME_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_FRAME_LIMIT} (2^31-1) bytes")
    return value


def size_or_zero(text: str) -> int:
    """An argparse type: a size in bytes (K, M, G suffixes), 0 or more (0: no limit)."""
    value = parse_size(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be a size in bytes, 0 (no limit) or more")
    return value


def whole_number(
    low: int, high: int | None, rule: str, what: str = "a whole number"
) -> Callable[[str], int]:
    """An argparse type: an int from ``low`` to ``high`` (None: no bound); ``rule`` if not."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(rule)
        return value

    return parse


positive_int = whole_number(1, None, "must be at least 1")


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    value = _seconds(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number of seconds, 0 or more")
    return value


def program_version(prog: str) -> str:
    """``"PROG VERSION"``: the installed distribution's version, else the package's own."""
    try:
        number = metadata.version("muxsrv")
    except metadata.PackageNotFoundError:  # run from a checkout, never installed
        number = __version__
    return f"{prog} {number}"


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, more than 0 (a wait that waits)."""
    value = _seconds(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number of seconds, more than 0")
    return value


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None


#: Options never shown in /stats and /metrics (none holds a secret today: the token
#: file's path is not one; kept as the place to say so).
_HIDDEN_OPTIONS: frozenset[str] = frozenset()


def options_in_force(options: argparse.Namespace) -> dict[str, Any]:
    """The options as /stats shows them: plain values, secrets omitted."""
    shown: dict[str, Any] = {}
    for key, value in sorted(vars(options).items()):
        if key in _HIDDEN_OPTIONS or "password" in key or "secret" in key:
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            shown[key] = value
        else:
            shown[key] = str(value)
    return shown
