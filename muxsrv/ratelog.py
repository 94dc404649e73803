"""A log line that a flood cannot turn into a flood of lines.

The first event of a kind is logged at once; the ones within the next
``interval`` seconds are only counted, and the next line that does go out
says how many were left out.  The UDP endpoint's drops (whose senders may be
forged) use one per reason.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .address import format_address

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Log the first event of a kind at once, then at most one summary per ``interval``.

    ``peer``: the address the event is about (the ``peer`` field of a JSON line).
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 level: int = logging.WARNING) -> None:
        self.log = logger
        self.interval = interval
        self.level = level
        self.last = -interval
        self.suppressed = 0

    def warning(self, msg: str, *args: object, peer: Any = None,
                exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            msg += f" ({self.suppressed} more like this not logged)"
        self.suppressed = 0
        self.last = now
        self.log.log(self.level, msg, *args, exc_info=exc_info,
                     extra=None if peer is None else {"peer": format_address(peer)})
