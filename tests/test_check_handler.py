"""check_handler: passes on the built-in and README handlers, and catches each kind of bug.

Each broken handler below has exactly one bug, and its test asserts that
check_handler raises HandlerCheckFailed naming that bug and the message and
variant that showed it.  Everything runs on the fake loop and clock except the
``real_loop`` tests (a socket pair and a real loop, waits with deadlines).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from support import ROOT

from muxsrv import plugins
from muxsrv.checks_real import RealChecker, RealHarness
from muxsrv.cli import build_parser
from muxsrv.handler import Conn, Handler
from muxsrv.handlers.builtin import echo, upper
from muxsrv.handlers.exec import ExecHandler
from muxsrv.testing import HandlerCheckFailed, check_handler, frame

pytestmark = pytest.mark.timeout(60)

MESSAGES = [b"hello", b"", b"w\xc3\xb6rld", b"x" * 300]


# -- handlers that pass ------------------------------------------------------------


def test_failure_reads_as_an_assertion_in_pytest() -> None:
    assert issubclass(HandlerCheckFailed, AssertionError)


@pytest.mark.parametrize("handler", [echo, upper])
def test_builtin_function_handlers_pass(handler: Any) -> None:
    check_handler(handler, MESSAGES)


def test_line_framing_passes() -> None:
    check_handler(upper, [b"one" * 100, b"two" * 100], framing="line")


def readme_module(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A README code block (``# name.py`` on its first line) imported as a module."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [
        c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if c.startswith(f"# {name}.py")
    ]
    assert len(blocks) == 1
    (tmp_path / f"{name}.py").write_text(blocks[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return __import__(name)


def test_readme_reverse_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_handler(readme_module("reverse", tmp_path, monkeypatch).reverse, MESSAGES)


def test_readme_counter_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_handler(readme_module("counter", tmp_path, monkeypatch).Counter, MESSAGES)


def exec_factory(cwd: Path) -> Any:
    loaded = plugins.load(plugins.find("exec"))
    options: argparse.Namespace = build_parser(loaded).parse_args(
        ["--handler", "exec", "--exec-cwd", str(cwd)]
    )
    return ExecHandler.configure(options)


def test_exec_passes_on_the_real_loop(tmp_path: Path) -> None:
    check_handler(
        exec_factory(tmp_path), [b"echo hi", b"true", b"exit 3"], real_loop=True, timeout=10
    )


def test_the_real_loop_sends_a_segment_larger_than_the_socket_buffers() -> None:
    """Bug caught: a blocking sendall of a segment the socket pair cannot hold waits for
    a loop that is not turning: the check hung for ever."""
    checker = RealChecker(echo, [b"x"], "length", 0, 0.1, 10.0)
    h = RealHarness(checker, "one large segment")
    try:
        big = frame(b"y" * 3_000_000)  # far beyond a socket pair's buffers
        h.send(big + frame(b"z"))
        h.settle()
        assert h.replies() == [b"y" * 3_000_000, b"z"]
    finally:
        h.close()


def _children() -> set[int]:
    me = str(Path("/proc/self").resolve().name)
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            found.add(int(stat.parent.name))
    return found


def test_a_failed_real_variant_lets_go_of_the_handlers_children(tmp_path: Path) -> None:
    """Bug caught: a variant that timed out left its connection open, so exec's child
    (and its pipes) outlived the check."""
    before = _children()
    with pytest.raises(HandlerCheckFailed, match="timed out"):
        check_handler(exec_factory(tmp_path), [b"sleep 30"], real_loop=True, timeout=0.5)
    assert _children() - before == set()


# -- broken handlers, one bug each -------------------------------------------------


class Batcher(Handler):
    """Bug: one reply per loop turn (per read), joining what that read brought."""

    def __init__(self) -> None:
        self.batch: list[bytes] = []

    def message_received(self, conn: Conn, payload: bytes) -> None:
        if not self.batch:
            conn.loop.call_soon(self.flush, conn)
        self.batch.append(payload)

    def flush(self, conn: Conn) -> None:
        conn.send(b"|".join(self.batch))
        self.batch.clear()


def test_replies_that_depend_on_the_split_are_caught() -> None:
    with pytest.raises(
        HandlerCheckFailed,
        match=r"reply 0 \(to message 0 \(b'a'\)\) differs "
        r"between splits: b'a' instead of b'a\|b'.*one message at a time",
    ):
        check_handler(Batcher, [b"a", b"b"])


class SendsAfterClose(Handler):
    """Bug: a goodbye sent after its own close() (it is silently dropped)."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        if payload == b"quit":
            conn.close()
            conn.send(b"bye")
        else:
            conn.send(payload)


def test_a_send_after_the_handlers_own_close_is_caught() -> None:
    with pytest.raises(
        HandlerCheckFailed,
        match=r"send after the handler's own close\(\)/abort"
        r"\(\), at message 1 \(b'quit'\), in variant 'all messages in one read'",
    ):
        check_handler(SendsAfterClose, [b"hi", b"quit"])


class SendsAfterLost(Handler):
    """Bug: a reply from a timer that never asks whether the connection is still there."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.loop.call_later(1.0, conn.send, payload)


def test_a_send_after_connection_lost_is_caught() -> None:
    with pytest.raises(HandlerCheckFailed, match=r"send after connection_lost, at message 0"):
        check_handler(SendsAfterLost, [b"late"])


def raises_on_boom(payload: bytes) -> bytes:
    """Bug: raises on one message."""
    if payload == b"boom":
        raise ValueError("no booms")
    return payload


def test_an_exception_is_caught_naming_the_message() -> None:
    with pytest.raises(
        HandlerCheckFailed,
        match=r"the handler raised ValueError: no booms, at "
        r"message 1 \(b'boom'\)",
    ):
        check_handler(raises_on_boom, [b"ok", b"boom"])


class RaisesInTimer(Handler):
    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.work_started()
        conn.loop.call_later(0.5, self.reply, conn, payload)

    def reply(self, conn: Conn, payload: bytes) -> None:
        conn.work_done()
        raise RuntimeError("timer bug")


def test_an_exception_in_a_timer_is_caught() -> None:
    with pytest.raises(HandlerCheckFailed, match=r"a timer raised RuntimeError: timer bug"):
        check_handler(RaisesInTimer, [b"x"])


def test_a_callback_that_blocks_the_loop_is_caught() -> None:
    slept = []

    def blocks_once(payload: bytes) -> bytes:
        """Bug: a blocking call (the real monotonic clock measures it)."""
        if not slept:
            slept.append(True)
            time.sleep(0.05)
        return payload

    with pytest.raises(
        HandlerCheckFailed,
        match=r"the handler ran for \d+ ms \(more than 20 ms: "
        r"it blocks the loop\), at message 0 \(b'a'\)",
    ):
        check_handler(blocks_once, [b"a"], max_callback_seconds=0.02)
    assert slept == [True]


class KeepsTalking(Handler):
    """Bug: once told pause_writing, sends a notice every 10 ms instead of stopping."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.send(payload)

    def pause_writing(self, conn: Conn) -> None:
        conn.loop.call_later(0.01, self.notice, conn)

    def notice(self, conn: Conn) -> None:
        if not conn.closing:
            conn.send(b"n" * 65536)
            conn.loop.call_later(0.01, self.notice, conn)


def test_output_that_grows_while_the_client_does_not_read_is_caught() -> None:
    with pytest.raises(
        HandlerCheckFailed,
        match=r"output grows without bound while the client "
        r"does not read .*in variant 'the client does not read'",
    ):
        check_handler(KeepsTalking, [b"m" * 1000])


def test_a_handler_that_honours_pause_writing_is_bounded() -> None:
    """The same handler without its bug passes: the bound is not a false alarm."""

    class Quiet(KeepsTalking):
        def pause_writing(self, conn: Conn) -> None:
            pass

    check_handler(Quiet, [b"m" * 1000])


class Reorders(Handler):
    """Bug: answers from timers whose delay shrinks per message: the last answer first."""

    def connection_made(self, conn: Conn) -> None:
        self.delay = 3.0

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.work_started()
        conn.loop.call_later(self.delay, self.reply, conn, payload)
        self.delay -= 1.0

    def reply(self, conn: Conn, payload: bytes) -> None:
        conn.send(payload)
        conn.work_done()


def test_replies_out_of_order_are_caught() -> None:
    with pytest.raises(
        HandlerCheckFailed,
        match=r"replies out of order: the reply to message 1 "
        r"\(b'second'\) came before the reply to message 0 \(b'first'\)",
    ):
        check_handler(Reorders, [b"first", b"second"])


class ResetUnsafe(Handler):
    """Bug: connection_lost assumes a reply was sent (fails when the client resets first)."""

    def connection_made(self, conn: Conn) -> None:
        self.answered = 0

    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.send(payload)
        self.answered += 1

    def eof_received(self, conn: Conn) -> None:
        self.eof = True

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        if exc is not None:
            raise RuntimeError("lost without EOF")


def test_a_failure_on_reset_names_the_reset_variant() -> None:
    with pytest.raises(
        HandlerCheckFailed,
        match=r"connection_lost raised RuntimeError: lost "
        r"without EOF.*client resets before reading a reply",
    ):
        check_handler(ResetUnsafe, [b"a" * 1000])


def test_the_real_loop_catches_exceptions_too(tmp_path: Path) -> None:
    with pytest.raises(
        HandlerCheckFailed,
        match=r"the handler raised ValueError: no booms, at "
        r"message 1 \(b'boom'\), in variant 'all messages in one read'",
    ):
        check_handler(raises_on_boom, [b"ok", b"boom"], real_loop=True, timeout=10)


def test_the_real_loop_catches_replies_that_depend_on_the_split() -> None:
    with pytest.raises(HandlerCheckFailed, match=r"differs between splits"):
        check_handler(Batcher, [b"a", b"b"], real_loop=True, timeout=10)


def test_the_real_loop_catches_a_callback_that_blocks() -> None:
    slept = []

    def blocks_once(payload: bytes) -> bytes:
        if not slept:
            slept.append(True)
            time.sleep(0.05)
        return payload

    with pytest.raises(HandlerCheckFailed, match=r"the handler ran for \d+ ms \(more than 20 ms"):
        check_handler(blocks_once, [b"a"], max_callback_seconds=0.02, real_loop=True, timeout=10)


def test_a_handler_on_real_descriptors_is_told_to_use_the_real_loop(tmp_path: Path) -> None:
    with pytest.raises(HandlerCheckFailed, match=r"real file descriptor.*use real_loop=True"):
        check_handler(exec_factory(tmp_path), [b"true"])
