"""A conformance check any handler can run against itself: :func:`check_handler`.

In the spirit of trio's ``check_two_way_stream``: one call replays a list of
messages through the real :class:`~muxsrv.connection.Connection` and
:class:`~muxsrv.loop.EventLoop` (over the fake socket and clock of
``muxsrv.testing``) in every way a network may deliver them, and fails with
:class:`HandlerCheckFailed`, naming the message and the variant, on the first
thing a handler must never do.

The reference run hands over every message in one read, then EOF.  Every
other variant must give the same replies (the whole sequence, compared as
payloads; a handler may send zero or more replies per message):

* one message at a time, waiting for its replies (this run also tells which
  message each reply answers, so a pipelined run that reorders them is
  reported as *replies out of order*);
* each message in its own segment, byte at a time, split in two at every byte
  (at most ``max_splits`` of them, evenly spaced), in seeded random chunks;
* with a transport whose ``send`` takes one byte at a time;
* with EOF right after each message (compared with the reference run of
  that prefix).

And, without comparing replies: the client resetting before any reply and
mid-reply (the connection ends, ``connection_lost`` once); the client not
reading at all while it keeps sending (the output waiting for it stays
bounded: the connection stops reading, the handler stops producing).

In every variant: no exception from a handler callback or from a timer or
reader it registered, no callback running longer than
``max_callback_seconds`` (it would block every other client), no send after
the handler's own ``close()``/``abort()`` or after ``connection_lost``,
``connection_lost`` at most once.

A handler that needs real file descriptors (``exec``'s child processes) runs
with ``real_loop=True``: see :mod:`muxsrv.checks_real`.  On the fake loop,
one still watching real descriptors once nothing else can happen fails with
that advice (the fake selector never reports them ready).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from typing import Any

from .checks_probe import CheckedHandler, Probe, checked_function
from .codec import MAX_FRAME_LIMIT, Buffer
from .framing import make_decoder
from .handler import Handler, HandlerFactory, HandlerFunction
from .testing import Harness
from .transport import HIGH_WATER, RECV_SIZE

__all__ = ["HandlerCheckFailed", "check_handler", "encode_messages", "is_function_handler"]

#: The reference variant, which every other one is compared with.
REFERENCE = "all messages in one read"
#: Loop turns one variant may take (a 0-delay timer re-arming itself never settles).
MAX_TURNS = 2_000_000
#: Output beyond the bound's estimate a non-reading client may still be owed.
UNREAD_SLACK = 64 * 1024


class HandlerCheckFailed(AssertionError):
    """The handler broke a guarantee; the message names the message and the variant."""


def is_function_handler(handler: Any) -> bool:
    """True for the function form (one required argument), False for a class or factory."""
    if isinstance(handler, type):
        return False
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is p.empty for p in params) == 1


def encode_messages(messages: Sequence[bytes], framing: str) -> list[bytes]:
    """Each message as the client sends it."""
    encode = make_decoder(framing, MAX_FRAME_LIMIT).encode
    out = []
    for payload in messages:
        parts: list[Buffer] = []
        encode(parts, payload)
        out.append(b"".join(parts))
    return out


# -- the check -------------------------------------------------------------------


class Checker:
    """One handler, one list of messages, every variant (on the fake loop)."""

    def __init__(
        self,
        handler: Any,
        messages: Sequence[bytes],
        framing: str,
        seed: int,
        random_runs: int,
        max_splits: int,
        max_callback_seconds: float,
        settle_seconds: float,
        unread_bytes: int,
    ) -> None:
        if framing not in ("length", "line"):
            raise ValueError(f"check_handler compares messages: framing {framing!r} has none")
        self.function: HandlerFunction | None = None
        self.factory: HandlerFactory | None = None
        if is_function_handler(handler):
            self.function = handler
        else:
            self.factory = handler
        self.name = getattr(handler, "__qualname__", repr(handler))
        self.messages = list(messages)
        self.framing = framing
        self.seed = seed
        self.random_runs = random_runs
        self.max_splits = max_splits
        self.limit = max_callback_seconds
        self.settle_seconds = settle_seconds
        self.unread_bytes = unread_bytes
        self.encoded = encode_messages(self.messages, framing)
        self.data = b"".join(self.encoded)

    # -- one run --------------------------------------------------------------

    def start(self) -> tuple[Harness, Probe, Callable[[], list[bytes]]]:
        probe = Probe(self.messages or [b""], self.limit)
        if self.function is not None:
            h = Harness(function=checked_function(self.function, probe), framing=self.framing)
        else:
            factory = self.factory
            assert factory is not None
            h = Harness(lambda: CheckedHandler(factory(), probe), framing=self.framing)
        if self.framing == "length":
            return h, probe, h.replies
        client = make_decoder(self.framing, MAX_FRAME_LIMIT)
        seen = 0

        def replies() -> list[bytes]:
            nonlocal seen
            data, seen = bytes(h.sock.sent[seen:]), len(h.sock.sent)
            return client.feed(data)

        return h, probe, replies

    def fail(self, problem: str, variant: str) -> None:
        raise HandlerCheckFailed(f"{self.name}: {problem}, in variant '{variant}'")

    def settle(self, h: Harness, probe: Probe, variant: str, bound: int | None = None) -> None:
        """Turn the loop (fake time passing) until nothing more happens; fail on a problem."""
        h.selector.until = h.clock.now + self.settle_seconds
        try:
            for _ in range(MAX_TURNS):
                h.loop.run_once()
                if probe.problems:
                    self.fail(probe.problems[0], variant)
                if bound is not None and h.conn.pending > bound:
                    self.fail(
                        f"output grows without bound while the client does not read "
                        f"({h.conn.pending} bytes pending, more than {bound}), at "
                        f"{probe.where()}",
                        variant,
                    )
                if h.selector.settled:
                    if h.loop.watched_fds:
                        self.fail(
                            f"waits on {h.loop.watched_fds} real file descriptor(s), which the "
                            f"fake loop never reports ready (use real_loop=True), at "
                            f"{probe.where()}",
                            variant,
                        )
                    return
            self.fail(f"the loop did not settle in {MAX_TURNS} turns, at {probe.where()}", variant)
        finally:
            h.selector.until = None

    def run(
        self, variant: str, segments: Sequence[bytes], max_send: int | None = None
    ) -> tuple[list[bytes], int]:
        """Replies to ``segments`` then EOF; and the bytes sent."""
        h, probe, replies = self.start()
        with h:
            h.sock.max_send = max_send
            self.settle(h, probe, variant)
            h.peer_sends(*segments)
            h.sock.peer_shuts_down()
            self.settle(h, probe, variant)
            return replies(), len(h.sock.sent)

    def lockstep(self, variant: str) -> tuple[list[bytes], list[str]]:
        """One message at a time, waiting for its replies: each reply with what it answers."""
        h, probe, replies = self.start()
        out: list[bytes] = []
        labels: list[str] = []

        def collect(label: str) -> None:
            got = replies()
            out.extend(got)
            labels.extend([label] * len(got))

        with h:
            self.settle(h, probe, variant)
            collect("connection_made")
            for i, data in enumerate(self.encoded):
                h.peer_sends(data)
                self.settle(h, probe, variant)
                collect(f"message {i} ({self.messages[i]!r:.60})")
            h.sock.peer_shuts_down()
            self.settle(h, probe, variant)
            collect("EOF")
        return out, labels

    # -- comparing ------------------------------------------------------------

    def compare(
        self, expected: list[bytes], got: list[bytes], labels: list[str], variant: str
    ) -> None:
        if got == expected:
            return
        j = next(
            (k for k, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
            min(len(expected), len(got)),
        )
        label = labels[j] if j < len(labels) else "no message"
        if j >= len(got):
            problem = f"reply {j} (to {label}) is missing: {len(got)} replies, not {len(expected)}"
        elif j >= len(expected):
            problem = (
                f"an extra reply {j}: {got[j]!r:.60} ({len(got)} replies, not {len(expected)})"
            )
        else:
            problem = (
                f"reply {j} (to {label}) differs between splits: {got[j]!r:.60} instead "
                f"of {expected[j]!r:.60}"
            )
        self.fail(problem, variant)

    def check_order(self, pipelined: list[bytes], stepped: list[bytes], labels: list[str]) -> None:
        """The reference's replies in the order of the messages they answer."""
        if pipelined == stepped or sorted(pipelined) != sorted(stepped):
            return
        j = next(k for k, (a, b) in enumerate(zip(stepped, pipelined, strict=False)) if a != b)
        k = next(k for k in range(j, len(stepped)) if stepped[k] == pipelined[j])
        self.fail(
            f"replies out of order: the reply to {labels[k]} came before the reply to {labels[j]}",
            REFERENCE,
        )

    # -- the variants ---------------------------------------------------------

    def split_points(self) -> list[int]:
        n = len(self.data)
        points = list(range(1, n))
        if len(points) > self.max_splits:
            step = len(points) / self.max_splits
            points = sorted({points[int(i * step)] for i in range(self.max_splits)})
        return points

    def message_at(self, offset: int) -> int:
        end = 0
        for i, data in enumerate(self.encoded):
            end += len(data)
            if offset < end:
                return i
        return len(self.encoded) - 1

    def random_chunks(self, rng: random.Random) -> list[bytes]:
        data, out, at = self.data, [], 0
        while at < len(data):
            size = rng.randint(1, max(1, min(len(data), 64)))
            out.append(data[at : at + size])
            at += size
        return out

    def check(self) -> None:
        reference, sent = self.run(REFERENCE, [self.data])
        labels = self.check_stepped(reference)
        self.check_unread(reference, sent)
        self.check_reset(sent)
        self.check_splits(reference, labels)
        variant = "send() takes one byte at a time"
        self.compare(reference, self.run(variant, [self.data], max_send=1)[0], labels, variant)
        self.check_eof_after_each(labels)

    def check_stepped(self, reference: list[bytes]) -> list[str]:
        """One message at a time: the same replies, in order; which message each answers."""
        variant = "one message at a time, waiting for the replies"
        stepped, labels = self.lockstep(variant)
        self.check_order(reference, stepped, labels)
        self.compare(reference, stepped, labels, variant)
        return labels

    def check_splits(self, reference: list[bytes], labels: list[str]) -> None:
        """The same replies however the bytes are cut into segments."""
        variants: list[tuple[str, list[bytes]]] = [
            ("each message in its own segment", self.encoded),
            ("byte at a time", [self.data[i : i + 1] for i in range(len(self.data))]),
        ]
        variants += [
            (
                f"split at byte {k} (inside message {self.message_at(k)})",
                [self.data[:k], self.data[k:]],
            )
            for k in self.split_points()
        ]
        for r in range(self.random_runs):
            rng = random.Random(self.seed + r)
            variants.append((f"random chunks (seed {self.seed + r})", self.random_chunks(rng)))
        for variant, segments in variants:
            self.compare(reference, self.run(variant, segments)[0], labels, variant)

    def check_eof_after_each(self, labels: list[str]) -> None:
        """EOF right after message i: the replies of the reference run of that prefix."""
        for i in range(len(self.encoded)):
            prefix = b"".join(self.encoded[: i + 1])
            expected = self.run(f"{REFERENCE}, of messages 0-{i}", [prefix])[0]
            variant = f"EOF after message {i}"
            segments = self.encoded[: i + 1]
            self.compare(expected, self.run(variant, segments)[0], labels, variant)

    def check_reset(self, sent: int) -> None:
        for variant, allow in (
            ("client resets before reading a reply", 0),
            ("client resets mid-reply", sent // 2),
        ):
            h, probe, _ = self.start()
            with h:
                h.sock.capacity = allow
                self.settle(h, probe, variant)
                h.peer_sends(self.data)
                self.settle(h, probe, variant)
                h.sock.peer_resets()
                self.settle(h, probe, variant)
                if h.closed != 1:
                    self.fail(
                        f"the connection did not end once ({h.closed} times), at {probe.where()}",
                        variant,
                    )
                if self.factory is not None and probe.lost != 1:
                    self.fail(
                        f"connection_lost ran {probe.lost} times, at {probe.where()}", variant
                    )

    def check_unread(self, reference: list[bytes], sent: int) -> None:
        """The client sends and sends but reads nothing: the output stays bounded."""
        if not self.data:
            return
        variant = "the client does not read"
        amplification = sent / len(self.data)
        largest = max((len(r) for r in reference), default=0) + 16
        bound = HIGH_WATER + 2 * int(RECV_SIZE * amplification + largest) + UNREAD_SLACK
        repeats = max(1, self.unread_bytes // len(self.data))
        h, probe, _ = self.start()
        with h:
            h.sock.capacity = 0
            self.settle(h, probe, variant, bound)
            h.peer_sends(*[self.data] * repeats)
            self.settle(h, probe, variant, bound)


def check_handler(
    handler: HandlerFunction | HandlerFactory | type[Handler],
    messages: Sequence[bytes],
    *,
    framing: str = "length",
    seed: int = 0,
    random_runs: int = 5,
    max_splits: int = 1000,
    max_callback_seconds: float = 0.1,
    settle_seconds: float = 60.0,
    unread_bytes: int = 2 * HIGH_WATER + RECV_SIZE,
    real_loop: bool = False,
    timeout: float = 30.0,
) -> None:
    """Replay ``messages`` through ``handler`` in every variant; raise on the first problem.

    ``handler`` is a function handler, a handler class or a factory (what
    ``configure`` returns): a fresh instance per variant.  ``settle_seconds``
    of fake time pass after each step, so timers due by then fire.  With
    ``real_loop`` (handlers that need real file descriptors), the real loop
    and a socket pair instead, each step waiting at most ``timeout`` seconds:
    replies are compared over the same splits (fewer two-way splits and
    random runs) and EOF variants, and order, exceptions, the callback bound
    and late sends are checked; the one-byte ``send()``, the resets and the
    non-reading client are not (``settle_seconds``, ``random_runs``,
    ``max_splits`` and ``unread_bytes`` do not apply).
    Raises :class:`HandlerCheckFailed`, naming the message and the variant.
    """
    if real_loop:
        from .checks_real import check_real

        check_real(
            handler,
            messages,
            framing=framing,
            seed=seed,
            max_callback_seconds=max_callback_seconds,
            timeout=timeout,
        )
        return
    Checker(
        handler,
        messages,
        framing,
        seed,
        random_runs,
        max_splits,
        max_callback_seconds,
        settle_seconds,
        unread_bytes,
    ).check()
