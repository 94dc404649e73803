"""A connection's output backlog: what the kernel has not taken yet, in order.

A connection first tries to send its replies at once (see ``connection.py``);
only what ``send`` did not take comes here.  The queue keeps a running byte
count, so asking how much is pending never walks the queue, and every buffer
is counted once when it arrives and once when it leaves: the cost of a
backlog is linear in its bytes and buffers, whatever its shape (one 1 GiB
reply or 1.5 million 5-byte ones).

``chunk()`` gives what the next send should try: small buffers at the front are
joined (up to ``JOIN_MAX``) so a backlog of tiny replies leaves in large
sends, then up to ``MAX_IOV`` buffers for one ``sendmsg``.  ``consume(n)``
drops what a send took, keeping a partly sent buffer as a view.  No I/O here.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Final

from .codec import Buffer

__all__ = ["JOIN_MAX", "MAX_IOV", "OutputQueue"]

#: Output at most this large is joined into one buffer for ``send``; beyond, sent
#: as it is with ``sendmsg`` (a copy of a large reply would cost more than it saves).
JOIN_MAX: Final = 64 * 1024
#: ``sendmsg`` takes at most IOV_MAX (1024 on Linux) buffers.
MAX_IOV: Final = 1024


class OutputQueue:
    """Buffers waiting to be sent, with their total size in ``nbytes``."""

    __slots__ = ("_bufs", "nbytes")

    def __init__(self) -> None:
        self._bufs: deque[Buffer] = deque()
        #: Bytes waiting, in all.
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._bufs)

    def extend(self, bufs: list[Buffer]) -> None:
        """Queue ``bufs`` after what is waiting (each must have ``len`` in bytes)."""
        self._bufs.extend(bufs)
        self.nbytes += sum(map(len, bufs))

    def chunk(self) -> Buffer | list[Buffer]:
        """One buffer for ``send``, or a list for ``sendmsg``: the front of the queue."""
        bufs = self._bufs
        if len(bufs) == 1:
            return bufs[0]
        if len(bufs[0]) < JOIN_MAX and len(bufs[1]) < JOIN_MAX:
            self._join_front()
            if len(bufs) == 1:
                return bufs[0]
        return list(islice(bufs, MAX_IOV))

    def _join_front(self) -> None:
        """Join the small buffers at the front into one, up to about ``JOIN_MAX`` bytes."""
        bufs = self._bufs
        parts: list[Buffer] = []
        size = 0
        while bufs and size < JOIN_MAX and len(bufs[0]) < JOIN_MAX:
            part = bufs.popleft()
            parts.append(part)
            size += len(part)
        bufs.appendleft(b"".join(parts))

    def consume(self, sent: int) -> None:
        """Drop the first ``sent`` bytes (what a send took)."""
        self.nbytes -= sent
        bufs = self._bufs
        while sent:
            size = len(bufs[0])
            if sent >= size:
                bufs.popleft()
                sent -= size
            else:
                bufs[0] = memoryview(bufs[0])[sent:]
                return

    def clear(self) -> None:
        self._bufs.clear()
        self.nbytes = 0
