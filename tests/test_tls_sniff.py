"""A TLS ClientHello on a plaintext port, in every framing: refused on its first bytes.

Decoders alone (whole, byte at a time, every split), one real Connection over
the fake socket and clock, and one real server with Python's ssl as the client.
Bugs caught: a line or raw server that hands a ClientHello to the handler (or
holds it waiting for a newline); a raw server that refuses a client whose
bytes only happen to contain a record header later on; a decoder that keeps
checking after the first bytes (the refusing class must turn into the plain one).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import Owner, running_server
from tls_certs import Certs

from muxsrv.auth import Gate, Tokens
from muxsrv.codec import TLS_ON_PLAINTEXT, opens_tls_record
from muxsrv.connection import Connection
from muxsrv.framing import LineDecoder, RawDecoder, make_decoder
from muxsrv.loop import EventLoop
from muxsrv.testing import FakeClock, FakeSelector, FakeSocket, Harness

#: The start of a real ClientHello: record header (type 22, version 3.1, length), type 1.
HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\n\x00\n"


def test_looks_like_tls_needs_three_bytes() -> None:
    assert opens_tls_record(b"") is None
    assert opens_tls_record(b"\x16") is None
    assert opens_tls_record(b"\x16\x03") is None
    for third in range(5):
        assert opens_tls_record(bytes([0x16, 3, third])) is True
    assert opens_tls_record(b"\x16\x03\x05") is False
    assert opens_tls_record(b"\x16\x02\x01") is False
    assert opens_tls_record(b"GET") is False


def _feed_split(decoder: Any, data: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += decoder.feed(data[last:cut])
        last = cut
    return out


@given(st.lists(st.integers(0, len(HELLO)), max_size=6))
def test_line_refuses_a_hello_at_every_split(cuts: list[int]) -> None:
    decoder = make_decoder("line", 1 << 20, refuse_tls=True)
    assert _feed_split(decoder, HELLO, cuts) == []
    assert decoder.error == TLS_ON_PLAINTEXT
    assert decoder.buffered == 0  # nothing of it held


def test_line_byte_at_a_time_then_plain_class() -> None:
    decoder = make_decoder("line", 1 << 20, refuse_tls=True)
    assert [decoder.feed(bytes([b])) for b in HELLO[:2]] == [[], []]
    assert decoder.error is None  # two bytes: too few to tell
    assert decoder.feed(HELLO[2:3]) == [] and decoder.error == TLS_ON_PLAINTEXT
    plain = make_decoder("line", 1 << 20, refuse_tls=True)
    assert plain.feed(b"\x16") == []  # held, as any unfinished line is
    assert plain.feed(b"\n\x16\x03\x01\n") == [b"\x16", b"\x16\x03\x01"]  # later: just bytes
    assert type(plain) is LineDecoder and plain.error is None  # checks no more


@given(st.lists(st.integers(1, len(HELLO)), max_size=4))
def test_raw_refuses_a_first_chunk_that_opens_a_record(cuts: list[int]) -> None:
    decoder = make_decoder("raw", 1 << 20, refuse_tls=True)
    first = min([*cuts, len(HELLO)])
    got = _feed_split(decoder, HELLO, cuts)
    if first >= 3:
        assert got == [] and decoder.error == TLS_ON_PLAINTEXT
    else:  # a first chunk of 1 or 2 bytes: too few to tell, so a raw client's bytes
        assert b"".join(got) == HELLO and decoder.error is None


def test_raw_any_other_first_bytes_are_a_clients_right() -> None:
    for first in (b"\x16", b"\x16\x03", b"\x16\x03\x05", b"x\x16\x03\x01"):
        decoder = make_decoder("raw", 1 << 20, refuse_tls=True)
        assert decoder.feed(first) == [first]  # delivered at once: a raw client never waits
        assert decoder.feed(HELLO) == [HELLO]
        assert type(decoder) is RawDecoder and decoder.error is None


def test_clients_decoders_do_not_refuse() -> None:
    assert make_decoder("line", 1 << 20).feed(HELLO) != []
    assert make_decoder("raw", 1 << 20).feed(HELLO) == [HELLO]


@pytest.mark.parametrize("framing", ["line", "raw"])
def test_a_connection_is_closed_with_one_log_line(
        framing: str, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    loop = EventLoop(selector=FakeSelector(clock), clock=clock)
    sock = FakeSocket()
    owner = Owner(loop)
    seen: list[bytes] = []

    def fn(payload: bytes) -> bytes:
        seen.append(payload)
        return payload

    fake: Any = sock
    conn = Connection(owner, fake, sock.getpeername(),
                      make_decoder(framing, 1 << 20, refuse_tls=True), fn, None)
    try:
        with caplog.at_level(logging.INFO, logger="muxsrv"):
            conn.start()
            sock.peer_sends(HELLO)
            for _ in range(20):
                loop.run_once(max_wait=0)
            assert sock.shut_wr  # the write side shut at once: the peer's read ends
            sock.peer_shuts_down()  # as the TLS client does once it sees our FIN
            for _ in range(20):
                loop.run_once(max_wait=0)
        assert owner.closed == [conn]
        assert seen == [] and bytes(sock.sent) == b""  # nothing reached the handler
        lines = [r.getMessage() for r in caplog.records if "looks like TLS" in r.getMessage()]
        assert lines == ["closing 127.0.0.1:40000: " + TLS_ON_PLAINTEXT]
    finally:
        loop.close()


@pytest.mark.parametrize("framing", ["line", "raw"])
def test_python_ssl_client_on_a_plaintext_server(certs: Certs, framing: str) -> None:
    with running_server("--framing", framing) as srv, \
            socket.create_connection(srv.address, timeout=10) as sock:
        context = certs.client_context()
        started = time.monotonic()
        with pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(sock, server_hostname="127.0.0.1")
        assert time.monotonic() - started < 5  # promptly, not at an idle timeout
        srv.wait_log("looks like TLS")
        assert srv.log_count("looks like TLS") == 1
        assert "Traceback" not in srv.stderr_text()
        # and the server still serves plaintext clients
        with socket.create_connection(srv.address, timeout=10) as plain:
            plain.sendall(b"hello\n")
            assert plain.recv(100).startswith(b"hello")


def test_the_line_auth_gate_refuses_a_hello_too(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With --auth-token-file the gate reads the first bytes (the decoder does not check):
    a ClientHello is refused as TLS, not buffered up to the 1 KiB limit."""
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-long-enough-0123\n")
    gate = Gate("line", Tokens(str(tokens)))
    with caplog.at_level(logging.INFO, logger="muxsrv"), \
            Harness(function=bytes, framing="line", gate=gate) as h:
        for byte in HELLO[:3]:  # byte at a time: decided on the third
            h.peer_sends(bytes([byte]))
            h.run()
        assert h.sock.shut_wr and h.sock.sent == b""
    assert [r.getMessage() for r in caplog.records if "looks like TLS" in r.getMessage()] == [
        "closing 127.0.0.1:40000: " + TLS_ON_PLAINTEXT]
