"""The PROXY protocol header stage alone (bytes in, bytes out, every split), then on a
connection over a fake socket and clock (conn.peer, the timeout, protected mode)."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxsrv.auth import AUTH_FAILED, LOCKED_OUT, MAX_FAILURES, PROTECTED_MODE, Gate, Tokens
from muxsrv.codec import ErrorFrame
from muxsrv.handler import Conn, Handler
from muxsrv.proxying import HEADER_TIMEOUT, Proxying, parse_networks
from muxsrv.stages import StagePath
from muxsrv.stages.proxy import MAX_V1, MAX_V2, PROXY_TIMEOUT, ProxyHeader, v1_header, v2_header
from muxsrv.testing import Harness, frame

SOCKET_PEER = ("127.0.0.1", 40000)
V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 9999\r\n"
V1_SIX = b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 9999\r\n"
V2 = v2_header(("192.0.2.7", 56324), ("198.51.100.1", 9999))
V2_SIX = v2_header(("2001:db8::7", 56324), ("2001:db8::1", 9999))
AFTER = b"\x00\x00\x00\x05hello\x16\x03\x01 and more"
HEADERS = {
    "v1": (V1, ("192.0.2.7", 56324)),
    "v1-tcp6": (V1_SIX, ("2001:db8::7", 56324, 0, 0)),
    "v2": (V2, ("192.0.2.7", 56324)),
    "v2-tcp6": (V2_SIX, ("2001:db8::7", 56324, 0, 0)),
    "v2-tlvs": (v2_header(("192.0.2.7", 56324), ("198.51.100.1", 9999),
                          tlvs=b"\x04\x00\x03abc" + b"\x05\x00\x00"), ("192.0.2.7", 56324)),
    "v1-unknown": (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", SOCKET_PEER),
    "v1-unknown-bare": (b"PROXY UNKNOWN\r\n", SOCKET_PEER),
    "v2-local": (v2_header(None), SOCKET_PEER),
    "v2-local-with-addresses": (v2_header(None, tlvs=bytes(12)), SOCKET_PEER),
    "v2-unspec": (b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x00", SOCKET_PEER),
    "v2-unix": (b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\xd8" + bytes(216), SOCKET_PEER),
}


def feed(stage: ProxyHeader, *segments: bytes) -> bytes:
    return b"".join(stage.receive(segment) for segment in segments)


@pytest.mark.parametrize("name", HEADERS)
def test_every_split_keeps_the_bytes_after_the_header(name: str) -> None:
    header, peer = HEADERS[name]
    data = header + AFTER
    splits = [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))]
    splits.append([data[i:i + 1] for i in range(len(data))])  # a byte at a time
    for segments in splits:
        stage = ProxyHeader(SOCKET_PEER)
        out = feed(stage, *segments)
        assert stage.error is None and stage.done and stage.ready, segments
        assert out == AFTER, segments
        assert stage.peer == peer
        assert stage.health_check == (peer == SOCKET_PEER and "unix" not in name
                                      and "unspec" not in name)


@pytest.mark.parametrize("name", HEADERS)
def test_incomplete_header_is_neither_ready_nor_an_error(name: str) -> None:
    header, _peer = HEADERS[name]
    stage = ProxyHeader(SOCKET_PEER)
    assert feed(stage, header[:-1]) == b""
    assert not stage.ready and not stage.done and stage.error is None


@pytest.mark.parametrize("data, reason", [
    (b"\x00\x00\x00\x05hello", "signature"),  # no header at all: a bare frame
    (b"GET / HTTP/1.1\r\n", "signature"),
    (b"PROXZ", "signature"),
    (b"\r\n\r\n\x00\r\nQUIX", "signature"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n", "v1 line"),
    (b"PROXY TCP4 192.0.2.7  198.51.100.1 56324 9999\r\n", "v1 line"),
    (b"PROXY TCP5 192.0.2.7 198.51.100.1 56324 9999\r\n", "v1 line"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 56324 9999\r\n", "not one"),
    (b"PROXY TCP4 192.0.2.300 198.51.100.1 56324 9999\r\n", "not one"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 9999\r\n", "not one"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 056 9999\r\n", "not one"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 9999\r\n", "not one"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 9999\n", "CRLF"),
    (b"PROXY TCP4 " + b"1" * 200, f"longer than {MAX_V1}"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + bytes(12), "command"),  # version 1
    (b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c" + bytes(12), "command"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x08" + bytes(8), "too short"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x12\x00\x0c" + bytes(12), "not a TCP stream"),  # UDP
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + (MAX_V2 - 15).to_bytes(2, "big"), f"at most {MAX_V2}"),
])
def test_malformed_or_oversized_headers_fail_as_early_as_they_can(data: bytes, reason: str) -> None:
    for segments in ([data], [data[i:i + 1] for i in range(len(data))]):
        stage = ProxyHeader(SOCKET_PEER)
        out = feed(stage, *segments)
        assert out == b"" and stage.error is not None and reason in stage.error, stage.error
        assert not stage.ready and not stage.tell_peer


def test_the_largest_headers_allowed_pass() -> None:
    six = b"ffff:" * 7 + b"ffff"
    line = b"PROXY TCP6 " + six + b" " + six + b" 65535 65535\r\n"
    stage = ProxyHeader()
    assert feed(stage, line + b"x") == b"x" and stage.peer == (six.decode(), 65535, 0, 0)
    line = b"PROXY UNKNOWN " + six + b" " + six + b" 65535 65535\r\n"  # the spec's worst case
    assert len(line) == MAX_V1
    stage = ProxyHeader()
    assert feed(stage, line + b"x") == b"x" and stage.health_check
    big = v2_header(("192.0.2.7", 1), ("192.0.2.8", 2), tlvs=b"\x04" + (MAX_V2 - 31).to_bytes(
        2, "big") + bytes(MAX_V2 - 31))
    assert len(big) == MAX_V2
    stage = ProxyHeader()
    assert feed(stage, big + b"x") == b"x" and stage.peer == ("192.0.2.7", 1)


def test_v1_header_builder_round_trips() -> None:
    assert v1_header(("192.0.2.7", 56324), ("198.51.100.1", 9999)) == V1


def test_refusal_is_asked_about_the_header_address() -> None:
    asked: list[object] = []

    def refusal(peer: object) -> str | None:
        asked.append(peer)
        return "no" if peer != SOCKET_PEER else None

    stage = ProxyHeader(SOCKET_PEER, refusal)
    assert feed(stage, V1 + AFTER) == b""
    assert asked == [("192.0.2.7", 56324)] and stage.error == "no" and stage.tell_peer
    stage = ProxyHeader(SOCKET_PEER, refusal)
    assert feed(stage, v2_header(None) + AFTER) == AFTER and stage.error is None
    assert asked[-1] == SOCKET_PEER


def test_the_path_hands_the_address_to_later_stages() -> None:
    class Later(ProxyHeader):  # any stage: only its peer attribute matters
        pass

    later = Later()
    path = StagePath([ProxyHeader(SOCKET_PEER), later])
    path.receive(V2)
    assert path.peer == ("192.0.2.7", 56324) and later.peer == path.peer


def test_parse_networks() -> None:
    assert [str(n) for n in parse_networks("10.0.0.0/8, ::1")] == ["10.0.0.0/8", "::1/128"]
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300'"):
        parse_networks("10.0.0.0/8,10.0.0.300")
    proxying = Proxying()
    assert proxying.trusts(("127.0.0.9", 1)) and proxying.trusts(("::1", 1, 0, 0))
    assert proxying.trusts(("::ffff:127.0.0.1", 1, 0, 0)) and proxying.trusts("/sock")
    assert not proxying.trusts(("10.0.0.1", 1)) and not proxying.trusts(("::2", 1, 0, 0))


# -- on a connection ------------------------------------------------------------------


class Recorder(Handler):
    def __init__(self) -> None:
        self.events: list[object] = []

    def connection_made(self, conn: Conn) -> None:
        self.events.append(("made", conn.peer))

    def message_received(self, conn: Conn, payload: bytes) -> None:
        self.events.append(payload)
        conn.send(repr(conn.peer).encode())


@pytest.mark.parametrize("header, peer", [(V1, ("192.0.2.7", 56324)),
                                          (V2_SIX, ("2001:db8::7", 56324, 0, 0))])
def test_conn_peer_is_the_header_address_before_connection_made(header: bytes,
                                                                 peer: object) -> None:
    with Harness(Recorder, proxying=Proxying()) as h:
        h.run()
        assert h.handler.events == []  # type: ignore[union-attr]
        h.peer_sends(header[:5], header[5:] + frame(b"a")[:2], frame(b"a")[2:] + frame(b"b"))
        h.run()
        assert h.handler.events == [("made", peer), b"a", b"b"]  # type: ignore[union-attr]
        assert h.replies() == [repr(peer).encode()] * 2
        assert h.conn.peer == peer and type(h.conn).__name__ == "Connection"  # stage gone


def test_header_timeout_closes_without_a_handler_call(caplog: pytest.LogCaptureFixture) -> None:
    with Harness(Recorder, proxying=Proxying()) as h:
        h.peer_sends(V1[:10])
        h.advance(PROXY_TIMEOUT - 0.1)
        assert not h.closed
        h.advance(0.2)
        h.sock.peer_shuts_down()  # the peer's EOF ends the lingering close
        h.run()
        assert h.closed == 1 and h.handler.events == []  # type: ignore[union-attr]
        assert h.replies() == []
    assert f"closing 127.0.0.1:40000: {HEADER_TIMEOUT} within 5 s" in caplog.text


def test_a_malformed_header_is_logged_with_the_socket_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Harness(Recorder, proxying=Proxying()) as h:
        h.peer_sends(frame(b"no header"))
        h.sock.peer_shuts_down()
        h.run()
        assert h.closed == 1 and h.handler.events == []  # type: ignore[union-attr]
        assert h.replies() == []  # nothing told: the peer is a balancer, not our client
    assert "closing 127.0.0.1:40000: bad PROXY protocol header" in caplog.text
    assert "Traceback" not in caplog.text


def test_protected_mode_uses_the_header_address() -> None:
    remote = v1_header(("192.0.2.7", 5), ("127.0.0.1", 9999))
    local = v1_header(("127.0.0.5", 5), ("127.0.0.1", 9999))
    for header, refused in ((remote, True), (local, False), (v2_header(None), False)):
        with Harness(Recorder, proxying=Proxying(), gate=Gate("length", None, protected=True)) as h:
            h.peer_sends(header + frame(b"x"))
            h.run()
            replies = h.replies()
            events = h.handler.events  # type: ignore[union-attr]
            if refused:
                assert replies == [ErrorFrame(PROTECTED_MODE.encode())] and events == []
            else:
                assert events[-1] == b"x" and len(replies) == 1


def test_wrong_tokens_count_against_the_header_address(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_bytes(b"s3cret-token-0123456789\n")
    gate = Gate("length", Tokens(str(tokens)))
    header = v1_header(("192.0.2.7", 5), ("127.0.0.1", 9999))
    for _ in range(MAX_FAILURES):
        with Harness(Recorder, proxying=Proxying(), gate=gate) as h:
            h.peer_sends(header + frame(b"AUTH wrong-token-000000000"))
            h.run()
            assert h.replies() == [ErrorFrame(AUTH_FAILED.encode())]
    assert gate.ledger.locked("192.0.2.7", 1000.0) and not gate.ledger.locked("127.0.0.1", 1000.0)
    with Harness(Recorder, proxying=Proxying(), gate=gate) as h:  # locked out, by the header
        h.peer_sends(header + frame(b"AUTH s3cret-token-0123456789"))
        h.run()
        assert h.replies() == [ErrorFrame(LOCKED_OUT.encode())]
    with Harness(Recorder, proxying=Proxying(), gate=gate) as h:  # another client: served
        h.peer_sends(v1_header(("192.0.2.8", 5), ("127.0.0.1", 9999))
                     + frame(b"AUTH s3cret-token-0123456789") + frame(b"x"))
        h.run()
        assert h.replies() == [b"OK", b"('192.0.2.8', 5)"]


def test_health_checks_are_logged_at_debug_level_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="muxsrv")
    with Harness(Recorder, proxying=Proxying()) as h:
        h.peer_sends(v2_header(None) + frame(b"ping")[:3])
        h.sock.peer_shuts_down()
        h.run()
        assert h.closed == 1
    assert caplog.records and all(r.levelname == "DEBUG" for r in caplog.records)
    caplog.clear()
    with Harness(Recorder, proxying=Proxying()) as h:
        h.peer_sends(V1 + frame(b"ping")[:3])
        h.sock.peer_shuts_down()
        h.run()
    assert any(r.levelname == "INFO" and "192.0.2.7:56324 closed mid-message" in r.message
               for r in caplog.records)
