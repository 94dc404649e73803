"""The connection state machine, driven deterministically through muxsrv.testing.

No network and no real time: a fake socket scripted by each test, a fake
clock, and the real loop and Connection.  Each test pins one guarantee of the
handler guide (replies never lost, connection_lost once and from the loop,
write back-pressure, bounded batches, linear output, replies as bytes, stages).
"""

from __future__ import annotations

import logging
import mmap
import struct
import tracemalloc
from array import array
from typing import Any

import pytest

from muxsrv.codec import MAX_BATCH, ErrorFrame
from muxsrv.handler import Conn, Handler
from muxsrv.stages import Stage
from muxsrv.testing import Harness, frame
from muxsrv.transport import HIGH_WATER, LOW_WATER

pytestmark = pytest.mark.timeout(120)


class Recorder(Handler):
    """Echoes every message and writes down every callback, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.conn: Conn | None = None

    def connection_made(self, conn: Conn) -> None:
        self.conn = conn
        self.events.append("made")

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self.events.append(("message", payload))
        conn.send(payload)

    def eof_received(self, conn: Conn) -> None:
        self.events.append("eof")

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        self.events.append("lost")

    def pause_writing(self, conn: Conn) -> None:
        self.events.append("pause_writing")

    def resume_writing(self, conn: Conn) -> None:
        self.events.append("resume_writing")

    def messages(self) -> list[bytes]:
        return [e[1] for e in self.events if isinstance(e, tuple)]


def handler_of(h: Harness) -> Any:
    assert h.handler is not None
    return h.handler


# -- 1. no reply lost -------------------------------------------------------


class TwoRepliesAtEof(Recorder):
    def eof_received(self, conn: Conn) -> None:
        super().eof_received(conn)
        conn.send(b"first after eof")
        conn.send(b"second after eof")


@pytest.mark.parametrize("capacity", [None, 4096, 300_000])
def test_every_reply_sent_from_eof_received_arrives_after_a_large_request(capacity: Any) -> None:
    big = bytes(range(256)) * (7 * 4096)  # 7 MiB
    with Harness(TwoRepliesAtEof) as h:
        h.sock.capacity = capacity
        h.peer_sends(frame(big) + frame(b"small"))
        h.sock.peer_shuts_down()
        replies: list[bytes] = []
        for _ in range(10_000):  # the peer reads a little at a time
            h.run()
            replies += h.replies()
            if h.closed:
                break
            h.sock.allow(capacity or 1 << 20)
        assert replies == [big, b"small", b"first after eof", b"second after eof"]
        assert h.closed == 1 and h.sock.used_after_close == 0
        h.run()
        assert handler_of(h).events[-2:] == ["eof", "lost"]


class AnswersLater(Recorder):
    def eof_received(self, conn: Conn) -> None:
        super().eof_received(conn)
        conn.work_started()
        conn.loop.call_later(3.0, self.answer, conn)

    def answer(self, conn: Conn) -> None:
        conn.send(b"worked on")
        conn.work_done()


def test_work_in_progress_after_eof_keeps_the_connection_until_its_reply() -> None:
    with Harness(AnswersLater) as h:
        h.peer_sends(frame(b"q"))
        h.sock.peer_shuts_down()
        h.advance(2)
        assert h.replies() == [b"q"] and not h.closed
        h.advance(2)
        assert h.replies() == [b"worked on"] and h.closed == 1


class PausesOnFirst(Recorder):
    def message_received(self, conn: Conn, payload: bytes) -> None:
        super().message_received(conn, payload)
        if len(self.messages()) == 1:
            conn.pause_reading()
            conn.loop.call_later(1.0, conn.resume_reading)


def test_a_paused_handler_answers_what_came_before_an_oversized_prefix_then_the_error() -> None:
    with Harness(PausesOnFirst, max_frame=1000) as h:
        h.peer_sends(frame(b"a") + frame(b"b") + frame(b"c") + struct.pack(">I", 5000) + b"x")
        h.run()
        assert h.replies() == [b"a"]  # paused: b and c wait, and so does the error
        assert not h.closed
        h.advance(1.5)
        replies = h.replies()
        assert replies[:2] == [b"b", b"c"]
        assert len(replies) == 3 and isinstance(replies[2], ErrorFrame)
        assert "exceeds the limit" in replies[2].text
        h.sock.peer_shuts_down()
        h.run()
        assert h.closed == 1


def test_replies_sent_from_a_timer_and_connection_made_arrive() -> None:
    class Greeter(Recorder):
        def connection_made(self, conn: Conn) -> None:
            super().connection_made(conn)
            conn.send(b"hello")
            conn.loop.call_later(5, conn.send, b"later")

    with Harness(Greeter) as h:
        h.run()
        assert h.replies() == [b"hello"]
        h.advance(5)
        assert h.replies() == [b"later"]


# -- 2. connection_lost once, from the loop -----------------------------------


class AbortsInside(Recorder):
    def message_received(self, conn: Conn, payload: bytes) -> None:
        self.events.append("abort")
        conn.abort()
        conn.abort()
        conn.close()
        self.events.append("abort returned")
        conn.send(b"ignored")


def test_abort_inside_message_received_runs_connection_lost_once_after_it_returns() -> None:
    with Harness(AbortsInside) as h:
        h.peer_sends(frame(b"one") + frame(b"two"))
        h.run()
        assert handler_of(h).events == ["made", "abort", "abort returned", "lost"]
        assert h.closed == 1 and h.sock.closed and h.sock.used_after_close == 0
        assert h.replies() == []


def test_a_reset_ends_the_connection_once() -> None:
    with Harness(Recorder) as h:
        h.peer_sends(frame(b"x"))
        h.sock.peer_resets()
        h.run()
        assert handler_of(h).events.count("lost") == 1 and h.closed == 1


# -- 3. write back-pressure -------------------------------------------------------


class WritingAware(Recorder):
    """Notes whether writing is paused (``paused``), as a producing handler must."""

    paused = False

    def pause_writing(self, conn: Conn) -> None:
        super().pause_writing(conn)
        self.paused = True

    def resume_writing(self, conn: Conn) -> None:
        super().resume_writing(conn)
        self.paused = False


class Producer(WritingAware):
    """Sends 64 KiB every tick until told to pause; goes on after resume."""

    def connection_made(self, conn: Conn) -> None:
        super().connection_made(conn)
        self.paused = False
        self.sent = 0
        self.tick(conn)

    def tick(self, conn: Conn) -> None:
        if not self.paused and not conn.closing and self.sent < 64:
            conn.send(bytes(64 * 1024))
            self.sent += 1
        conn.loop.call_later(0.01, self.tick, conn)



def test_pause_writing_above_high_water_and_resume_below_low_water() -> None:
    with Harness(Producer) as h:
        h.sock.capacity = 0  # the peer reads nothing
        h.advance(2)
        handler = handler_of(h)
        assert handler.events.count("pause_writing") == 1
        assert "resume_writing" not in handler.events
        assert HIGH_WATER < h.conn.pending <= HIGH_WATER + 64 * 1024 + 64
        stalled = handler.sent
        h.advance(2)
        assert handler.sent == stalled  # paused: produced nothing more
        h.sock.allow(h.conn.pending - LOW_WATER - 1)
        h.run()
        assert "resume_writing" not in handler.events  # not yet below low water
        h.sock.allow(10)
        h.run()
        assert handler.events[-1] == "resume_writing"
        h.sock.allow(None)
        h.advance(2)
        assert handler.sent == 64
        assert sum(map(len, h.replies())) == 64 * 64 * 1024


class ResumesAtOnce(WritingAware):
    """Sends from inside resume_writing, the natural way to go on."""

    def connection_made(self, conn: Conn) -> None:
        super().connection_made(conn)
        self.sent = 0
        self.paused = False
        conn.loop.call_soon(self.produce, conn)

    def produce(self, conn: Conn) -> None:
        while not self.paused and self.sent < 20:
            self.sent += 1
            conn.send(bytes([self.sent]) * 600_000)

    def resume_writing(self, conn: Conn) -> None:
        super().resume_writing(conn)
        self.produce(conn)


def test_replies_sent_from_resume_writing_are_all_delivered() -> None:
    """Bug caught: the event mask computed from the pending bytes seen before
    resume_writing ran: what it sent after the backlog drained was never written."""
    with Harness(ResumesAtOnce) as h:
        h.sock.capacity = 0
        h.run()
        replies: list[bytes] = []
        for _ in range(100):
            h.sock.allow(h.conn.pending)  # the peer takes exactly the backlog ...
            h.run()  # ... and resume_writing sends into a full socket again
            replies += h.replies()
            if len(replies) == 20:
                break
        assert replies == [bytes([i]) * 600_000 for i in range(1, 21)]
        assert handler_of(h).events.count("resume_writing") >= 2


# -- 4. linear cost, bounded batches, bounded memory ------------------------------


def test_a_backlog_of_many_tiny_replies_is_sent_with_linear_copying() -> None:
    count = 200_000

    class Flood(Recorder):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            for i in range(count):
                conn.send(i.to_bytes(4, "big"))

    with Harness(Flood) as h:
        h.sock.capacity = 0
        h.peer_sends(frame(b"go"))
        h.run()
        total = h.conn.pending
        assert total == count * 8
        for _ in range(100_000):
            h.sock.allow(4096)  # a slow reader: 4 KiB per wake-up
            h.run()
            if not h.conn.pending:
                break
        replies = h.replies()
        assert [int.from_bytes(r, "big") for r in replies] == list(range(count))
        # Each byte is offered to send() a bounded number of times, not once per send.
        assert h.sock.offered < 40 * total


def test_one_wake_up_hands_over_at_most_a_batch_and_the_rest_follows_in_order() -> None:
    n = 5 * MAX_BATCH + 7
    with Harness(Recorder) as h:
        h.peer_sends(b"".join(frame(str(i).encode()) for i in range(n)))
        h.turn()  # a batch from the read, and one more from the loop's step
        assert MAX_BATCH <= len(handler_of(h).messages()) <= 2 * MAX_BATCH
        h.run()
        assert handler_of(h).messages() == [str(i).encode() for i in range(n)]
        assert h.replies() == [str(i).encode() for i in range(n)]


def test_the_same_holds_for_the_function_form() -> None:
    n = 3 * MAX_BATCH
    with Harness(function=lambda p: p[::-1]) as h:
        h.peer_sends(b"".join(frame(b"ab%d" % i) for i in range(n)))
        h.turn()
        first = len(h.replies())
        assert MAX_BATCH <= first <= 2 * MAX_BATCH
        h.run()
        assert len(h.replies()) == n - first


def test_a_body_dripped_a_byte_per_segment_costs_memory_in_proportion() -> None:
    size = 40_000
    with Harness(Recorder) as h:
        h.peer_sends(struct.pack(">I", 1 << 20))
        h.run()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            h.peer_sends(*(b"x" for _ in range(size)))  # all segments exist up front ...
            segments = tracemalloc.get_traced_memory()[0] - before
            h.run()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # ... and are freed as they are read: what is left is the body itself.
        assert segments > 5 * size
        assert held < 3 * size + 64 * 1024, held
        assert handler_of(h).messages() == []


# -- 5. replies are bytes ---------------------------------------------------------


def test_a_memoryview_of_wide_items_is_framed_by_its_bytes_on_both_paths() -> None:
    wide = array("H", range(3000))

    class Sender(Recorder):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            conn.send(memoryview(wide))
            conn.send(memoryview(wide), memoryview(wide))

    with Harness(Sender) as h:
        h.peer_sends(frame(b"go"))
        h.run()
        assert h.replies() == [wide.tobytes(), wide.tobytes() * 2]
    with Harness(function=lambda p: memoryview(wide)) as h:
        h.peer_sends(frame(b"go") + frame(b"again"))
        h.run()
        assert h.replies() == [wide.tobytes(), wide.tobytes()]


def test_a_reply_too_large_for_the_framing_is_refused_clearly_on_both_paths() -> None:
    huge = mmap.mmap(-1, 1 << 31)  # virtual: no memory is touched
    errors: list[str] = []

    class Sender(Recorder):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            try:
                conn.send(memoryview(huge))
            except ValueError as exc:
                errors.append(str(exc))
            conn.send(b"still here")

    with Harness(Sender) as h:
        h.peer_sends(frame(b"go"))
        h.run()
        assert h.replies() == [b"still here"]
        assert errors == [f"a reply of {1 << 31} bytes does not fit a length frame "
                          f"(at most {(1 << 31) - 1})"]
    with Harness(function=lambda p: memoryview(huge) if p == b"huge" else p) as h:
        h.peer_sends(frame(b"huge") + frame(b"next"))
        h.run()
        replies = h.replies()
        assert isinstance(replies[0], ErrorFrame) and "ValueError" in replies[0].text
        assert replies[1:] == [b"next"]


def test_a_reply_that_is_not_bytes_is_a_type_error_naming_the_type() -> None:
    class Sender(Recorder):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            with pytest.raises(TypeError, match="send\\(\\) takes bytes, not str"):
                conn.send("text")  # type: ignore[arg-type]
            conn.send(b"ok")

    with Harness(Sender) as h:
        h.peer_sends(frame(b"go"))
        h.run()
        assert h.replies() == [b"ok"]


# -- 8. a stage on the byte path ---------------------------------------------------


class Hello(Stage):
    """A one-shot stage: the peer first says ``HELLO\\n``; then it leaves the path."""

    def __init__(self) -> None:
        self.ready = False
        self._seen = b""

    def receive(self, data: bytes) -> bytes:
        self._seen += data
        if len(self._seen) < 6:
            if not b"HELLO\n".startswith(self._seen):
                self.error = "no hello"
            return b""
        if not self._seen.startswith(b"HELLO\n"):
            self.error = "no hello"
            return b""
        self.ready = self.done = True
        return self._seen[6:]


class Rot(Stage):
    """A stage that stays: every byte in and out is shifted by one."""

    def receive(self, data: bytes) -> bytes:
        return bytes((b - 1) % 256 for b in data)

    def send(self, data: bytes) -> bytes:
        return bytes((b + 1) % 256 for b in data)


def test_the_handler_waits_for_a_one_shot_stage_and_gets_the_bytes_after_it() -> None:
    with Harness(Recorder, stages=[Hello()]) as h:
        h.peer_sends(b"HEL")
        h.run()
        assert handler_of(h).events == []
        h.peer_sends(b"LO\n" + frame(b"one")[:3], frame(b"one")[3:])
        h.run()
        assert handler_of(h).events == ["made", ("message", b"one")]
        assert h.replies() == [b"one"]


def test_a_stage_violation_closes_without_telling_the_handler() -> None:
    with Harness(Recorder, stages=[Hello()]) as h:
        h.peer_sends(b"HELP\n")
        h.run()
        assert handler_of(h).events == []
        assert h.sock.shut_wr and h.sock.sent == b""


def test_a_lasting_stage_transforms_both_directions() -> None:
    with Harness(Recorder, stages=[Rot()]) as h:
        h.peer_sends(bytes((b + 1) % 256 for b in frame(b"abc")))
        h.run()
        assert bytes(h.sock.sent) == bytes((b + 1) % 256 for b in frame(b"abc"))


class Boom(Stage):
    def __init__(self, where: str) -> None:
        self.where = where

    def receive(self, data: bytes) -> bytes:
        if self.where == "receive":
            raise RuntimeError("stage bug")
        return data

    def send(self, data: bytes) -> bytes:
        if self.where == "send" and data:
            raise RuntimeError("stage bug")
        return data


@pytest.mark.parametrize("where", ["receive", "send"])
def test_a_stage_that_raises_ends_its_connection_like_any_error(where: str) -> None:
    with Harness(Recorder, stages=[Boom(where)]) as h:
        h.peer_sends(frame(b"abc"))
        h.run()
        assert h.closed == 1 and h.sock.closed
        assert handler_of(h).events[-1] == "lost"


class Eager(Stage):
    """Breaks the stage contract: passes bytes on while not ready."""

    ready = False


def test_a_stage_passing_bytes_before_it_is_ready_never_reaches_the_handler() -> None:
    with Harness(Recorder, stages=[Eager()]) as h:
        h.peer_sends(frame(b"x"))
        h.run()
        assert handler_of(h).events == [] and h.closed == 1


@pytest.mark.parametrize("ending", ["eof", "oversized"])
def test_what_ends_the_input_waits_while_the_handler_has_paused_reading(ending: str) -> None:
    class PausesOnLast(Recorder):
        def message_received(self, conn: Conn, payload: bytes) -> None:
            super().message_received(conn, payload)
            if payload == b"last":
                conn.pause_reading()
                conn.loop.call_later(1.0, self.late, conn)

        def late(self, conn: Conn) -> None:
            conn.send(b"late reply")
            conn.resume_reading()

    # The line framing's last message arrives with the EOF; a length prefix too
    # large in the same read as the message before it.
    framing = "line" if ending == "eof" else "length"
    with Harness(PausesOnLast, framing=framing, max_frame=100) as h:
        if ending == "eof":
            h.peer_sends(b"a\nlast")
            h.sock.peer_shuts_down()
        else:
            h.peer_sends(frame(b"a") + frame(b"last") + struct.pack(">I", 1000))
        h.run()
        assert "eof" not in handler_of(h).events and not h.sock.shut_wr  # paused: it waits
        h.advance(1.5)
        if ending == "eof":
            assert h.sock.sent == b"a\nlast\nlate reply\n"
            assert handler_of(h).events[-2:] == ["eof", "lost"]
        else:
            replies = h.replies()
            assert replies[:3] == [b"a", b"last", b"late reply"]
            assert isinstance(replies[3], ErrorFrame)


# -- a handler failing before any reply ----------------------------------------------


class FailsOnConnect(Recorder):
    def connection_made(self, conn: Conn) -> None:
        super().connection_made(conn)
        conn.send(b"hello")  # queued before the failure: still delivered
        raise RuntimeError("cannot greet")


@pytest.mark.parametrize("framing", ["length", "line"])
def test_connection_made_that_raises_answers_with_an_error_frame_then_closes_gracefully(
    framing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug caught: a handler failing in connection_made reaching the client as a reset
    (the socket closed at once, what it sent first dropped) instead of an error frame."""
    with caplog.at_level(logging.ERROR, logger="muxsrv"), Harness(
        FailsOnConnect, framing=framing
    ) as h:
        h.peer_sends(frame(b"never handed over") if framing == "length" else b"never\n")
        h.run()
        if framing == "length":
            hello, error = h.replies()
            assert hello == b"hello" and isinstance(error, ErrorFrame)
            assert error.text == "handler error (RuntimeError); details are in the server log"
        else:  # no error channel: what was sent, then the close
            assert h.sock.sent == b"hello\n"
        assert h.sock.shut_wr and not h.sock.closed  # a lingering close, not a reset
        h.sock.peer_shuts_down()
        h.run()
        assert h.closed == 1 and h.sock.closed and h.sock.used_after_close == 0
        assert handler_of(h).events == ["made", "lost"]
    assert caplog.text.count("handler connection_made failed") == 1
    assert caplog.text.count("RuntimeError: cannot greet") == 1
