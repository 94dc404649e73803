"""Wrong-protocol hints: text (HTTP, telnet) on a length port is told so, on its first frame."""

from __future__ import annotations

import logging
import re
import struct

import pytest
from support import recv_until_eof, running_server

from muxsrv.codec import ErrorFrame
from muxsrv.framing import MAX_FRAME_LIMIT, TEXT_ON_LENGTH, LengthDecoder, make_decoder
from muxsrv.handler import Handler
from muxsrv.length import TLS_ON_PLAINTEXT, FirstFrameDecoder, looks_like_text
from muxsrv.testing import Harness, frame

HTTP = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
HINT = ErrorFrame(TEXT_ON_LENGTH.encode())


def echo(payload: bytes) -> bytes:
    return payload


class Recorder(Handler):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def message_received(self, conn: object, payload: bytes) -> None:
        self.got.append(payload)


def test_the_hint_is_the_contract_text() -> None:
    assert TEXT_ON_LENGTH == (
        "this port speaks length-prefixed frames; use --framing line for text clients")


@pytest.mark.parametrize("first", [
    HTTP, b"POST /x HTTP/1.1\r\n\r\n", b"HEAD / HTTP/1.0\r\n\r\n", b"PRI * HTTP/2.0\r\n",
    b"hello there\r\n", b"help\n", b"\xff\xfd\x03\xff\xfb\x18", b"a\r\n", b"ok\n",
])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("form", ["function", "class"])
def test_text_first_gets_the_hint(
    first: bytes, split: bool, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bugs caught: "frame of 1195725856 bytes exceeds the limit" for a browser or telnet;
    the hint missed when the first bytes come one at a time; any of it handed over."""
    kwargs = {"function": echo} if form == "function" else {}
    with Harness(Recorder if form == "class" else None, **kwargs) as h:  # type: ignore[arg-type]
        segments = [first[i : i + 1] for i in range(len(first))] if split else [first]
        for segment in segments:
            h.peer_sends(segment)
            h.run()
        assert h.replies() == [HINT]
        assert h.conn.closing
        if form == "class":
            assert h.handler.got == []  # type: ignore[union-attr]
    assert any(r.levelno == logging.WARNING and r.getMessage() ==
               f"closing 127.0.0.1:40000: {TEXT_ON_LENGTH}" for r in caplog.records)


def test_a_tls_client_hello_keeps_its_own_error() -> None:
    with Harness(function=echo) as h:
        h.peer_sends(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        h.run()
        assert h.replies() == [ErrorFrame(TLS_ON_PLAINTEXT.encode())]


@pytest.mark.parametrize("before", [
    [frame(b"first")], [frame(b"")], [b"\0\0", b"\0\x01x"], [frame(b"a") + b"GE"],
])
def test_only_the_first_message_is_judged(before: list[bytes]) -> None:
    """Bug caught: a later frame whose large length happens to read as text judged as a
    text client (it is the normal oversize error)."""
    with Harness(function=echo) as h:
        for segment in before:
            h.peer_sends(segment)
            h.run()
        h.peer_sends(b"GET / HTTP/1.1\r\n"[2:] if before[-1].endswith(b"GE") else
                     b"GET / HTTP/1.1\r\n")
        h.run()
        got = h.replies()
        (n,) = struct.unpack(">I", b"GET ")
        assert got[-1] == ErrorFrame(
            f"frame of {n} bytes exceeds the limit of {16 << 20} bytes".encode())
        assert HINT not in got
        assert h.conn.closing


def test_a_binary_oversized_first_frame_is_the_normal_error() -> None:
    with Harness(function=echo) as h:
        h.peer_sends(b"\xff\xff\xff\xff")
        h.run()
        assert h.replies() == [ErrorFrame(
            f"frame of {0xFFFFFFFF} bytes exceeds the limit of {16 << 20} bytes".encode())]


def test_the_decoder_becomes_plain_after_its_first_length_word() -> None:
    """Bug caught: the judging decoder left in place (its check on every read)."""
    decoder = make_decoder("length", 1000)
    assert type(decoder) is FirstFrameDecoder
    assert decoder.feed(b"\0\0") == []
    assert type(decoder) is FirstFrameDecoder  # a header split across reads: still judging
    assert decoder.feed(b"\0\x02hi" + frame(b"again")) == [b"hi", b"again"]
    assert type(decoder) is LengthDecoder


def test_text_within_a_huge_max_frame_is_just_a_frame() -> None:
    """Bug caught: a legal length refused because its bytes look like text."""
    decoder = make_decoder("length", MAX_FRAME_LIMIT)
    assert decoder.feed(b"GET / HTTP/1.1\r\n") == []
    assert decoder.error is None
    decoder = make_decoder("length", MAX_FRAME_LIMIT)
    assert decoder.feed(b"ok\n") == [] and decoder.error is None


def test_looks_like_text() -> None:
    assert looks_like_text(b"GET ") and looks_like_text(b"\t\r\n ")
    assert looks_like_text(b"\xff\xfb\x01")
    assert not looks_like_text(b"\0\0\0\x05") and not looks_like_text(b"GE\x80T")
    assert not looks_like_text(b"")


# -- a real socket --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_http_request_on_a_real_socket() -> None:
    with running_server() as srv, srv.connect() as sock:
        sock.sendall(HTTP)
        text = TEXT_ON_LENGTH.encode()
        assert recv_until_eof(sock) == (0x80000000 | len(text)).to_bytes(4, "big") + text
        srv.wait_log(rf"WARNING: closing 127\.0\.0\.1:\d+: {re.escape(TEXT_ON_LENGTH)}")
