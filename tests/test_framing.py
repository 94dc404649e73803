"""The sans-IO codecs: every way of cutting a stream into chunks gives the same messages.

One conformance suite runs over every framing that keeps message boundaries
(length, line), fed three ways: through ``feed`` alone; as a caller that
receives the rest of a large frame's body itself (``feed``, but that rest
through ``want``/``body_received``); and through the fused ``respond`` path, whose
handler must be called with exactly the messages ``feed`` returns.  ``respond``
must also frame replies exactly as the encoder does.  Raw framing, which has no
boundaries, gets its own properties.  Limits, EOF and the client's error frames
follow.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muxsrv.framing import (
    BODY_BUFFER_MIN,
    ENCODERS,
    ERROR_FLAG,
    MAX_FRAME_LIMIT,
    Buffer,
    Decoder,
    ErrorFrame,
    LengthDecoder,
    LineDecoder,
    RawDecoder,
    encode_error,
    make_decoder,
)

pytestmark = pytest.mark.timeout(60)

FRAMED = ("length", "line")
HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- the conformance helpers ---------------------------------------------------


def encode(framing: str, messages: Iterable[bytes]) -> bytes:
    out: list[Buffer] = []
    for m in messages:
        ENCODERS[framing](out, m)
    return b"".join(bytes(b) for b in out)


def via_feed(decoder: Decoder, chunks: Iterable[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out


def via_want(decoder: Decoder, chunks: Iterable[bytes]) -> list[bytes]:
    """Feed what the kernel has, but inside a large frame's body receive at most
    ``want`` bytes and hand them to ``body_received``."""
    out: list[bytes] = []
    for chunk in chunks:
        rest = chunk
        while rest and decoder.error is None:
            want = decoder.want
            if want:
                piece, rest = rest[:want], rest[want:]
                message = decoder.body_received(piece)
                if message is not None:
                    out.append(message)
            else:
                out += decoder.feed(rest)
                rest = b""
    return out


def via_respond(decoder: Decoder, chunks: Iterable[bytes]) -> list[bytes]:
    """The function handler's fused path: every message ``respond`` calls it with."""
    seen: list[bytes] = []

    def record(payload: bytes) -> None:
        seen.append(payload)

    def failed(exc: Exception) -> bool:
        raise AssertionError("the recording handler cannot fail") from exc

    replies: list[Buffer] = []
    for chunk in chunks:
        decoder.respond(chunk, record, replies, failed)
    assert replies == []
    return seen


FEEDERS: dict[str, Callable[[Decoder, Iterable[bytes]], list[bytes]]] = {
    "feed": via_feed,
    "want": via_want,
    "respond": via_respond,
}


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes with no b"\\n" or b"\\r" in them (valid for every framing)."""
    block = bytes((i * 7 + seed) % 200 + 32 for i in range(256))
    return (block * (n // 256 + 1))[:n]


#: Sizes around every boundary the length decoder has: empty, the header, the
#: point where an unfinished body gets a buffer of its own.
EDGE_SIZES = (0, 1, 3, 4, 5, BODY_BUFFER_MIN - 1, BODY_BUFFER_MIN, BODY_BUFFER_MIN + 1, 70000)
EDGE_MESSAGES = [pattern(n, seed=i) for i, n in enumerate(EDGE_SIZES)] + [b"x", b""]


def message_lists(framing: str) -> st.SearchStrategy[list[bytes]]:
    small = st.binary(max_size=40)
    if framing == "line":
        small = small.map(lambda b: b.replace(b"\n", b"").rstrip(b"\r"))
    sized = st.integers(BODY_BUFFER_MIN - 8, BODY_BUFFER_MIN * 3).map(pattern)
    return st.lists(st.one_of(small, small, sized), max_size=12)


# -- one suite over every framing that keeps boundaries ----------------------


@pytest.mark.parametrize("via", FEEDERS)
@pytest.mark.parametrize("framing", FRAMED)
class TestEveryFraming:
    """Bug caught: any chunk boundary (header, body, terminator) losing or merging data."""

    def test_whole(self, framing: str, via: str) -> None:
        decoder = make_decoder(framing, 1 << 20)
        assert FEEDERS[via](decoder, [encode(framing, EDGE_MESSAGES)]) == EDGE_MESSAGES
        assert decoder.error is None and decoder.buffered == 0

    def test_byte_at_a_time(self, framing: str, via: str) -> None:
        data = encode(framing, EDGE_MESSAGES)
        decoder = make_decoder(framing, 1 << 20)
        chunks = [data[i : i + 1] for i in range(len(data))]
        assert FEEDERS[via](decoder, chunks) == EDGE_MESSAGES

    def test_each_message_is_returned_by_the_byte_that_completes_it(
        self, framing: str, via: str
    ) -> None:
        # A decoder that waits for more input before returning a complete
        # message would stall a request/response client.
        decoder = make_decoder(framing, 1 << 20)
        for m in EDGE_MESSAGES:
            data = encode(framing, [m])
            assert FEEDERS[via](decoder, [data[:-1]]) == []
            assert FEEDERS[via](decoder, [data[-1:]]) == [m]

    @pytest.mark.parametrize("tail_size", [1, 3, 4, 10, BODY_BUFFER_MIN + 100])
    def test_trailing_data_is_kept_not_returned(
        self, framing: str, via: str, tail_size: int
    ) -> None:
        partial = encode(framing, [pattern(BODY_BUFFER_MIN * 2)])[:tail_size]
        decoder = make_decoder(framing, 1 << 20)
        data = encode(framing, EDGE_MESSAGES) + partial
        assert FEEDERS[via](decoder, [data]) == EDGE_MESSAGES
        assert decoder.buffered == tail_size
        # ... and the message completes when the rest arrives.
        rest = encode(framing, [pattern(BODY_BUFFER_MIN * 2)])[tail_size:]
        assert FEEDERS[via](decoder, [rest]) == [pattern(BODY_BUFFER_MIN * 2)]

    def test_every_two_piece_split(self, framing: str, via: str) -> None:
        """Bug caught: finishing a held tail from the next piece (only its front is
        joined to the tail) losing or repeating bytes after the tail's frame."""
        messages = [pattern(100), pattern(5000, 1), b"", pattern(10, 2), pattern(4095, 3)]
        stream = encode(framing, messages)
        for cut in range(len(stream)):
            decoder = make_decoder(framing, 1 << 20)
            assert FEEDERS[via](decoder, [stream[:cut], stream[cut:]]) == messages, cut
            assert decoder.buffered == 0

    @HYPOTHESIS
    @given(data=st.data())
    def test_any_split(self, framing: str, via: str, data: st.DataObject) -> None:
        messages = data.draw(message_lists(framing), label="messages")
        stream = encode(framing, messages)
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
        decoder = make_decoder(framing, 1 << 20)
        assert FEEDERS[via](decoder, split_at(stream, cuts)) == messages
        assert decoder.buffered == 0 and decoder.error is None

    def test_nothing_is_returned_after_a_violation(self, framing: str, via: str) -> None:
        limit = 10
        good = [b"a" * limit, b"", b"b"]
        bad = b"c" * (limit + 1)
        after = [b"after"] * 3
        stream = encode(framing, [*good, bad, *after])
        for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
            decoder = make_decoder(framing, limit)
            assert FEEDERS[via](decoder, chunks) == good
            assert decoder.error is not None and "11 bytes" in decoder.error
            assert decoder.eof() == []


# -- the length framing ----------------------------------------------------------


def test_length_empty_message() -> None:
    """Bug caught: N=0 read as 'need more data' (the next header swallowed as a body)."""
    d = LengthDecoder(100)
    assert d.feed(b"\0\0\0\0" * 3 + b"\0\0\0\1z") == [b"", b"", b"", b"z"]


@pytest.mark.parametrize("word", [0xFFFFFFFF, ERROR_FLAG, MAX_FRAME_LIMIT, 1025])
def test_length_oversize_prefix_rejected_before_any_body_byte(word: int) -> None:
    """Bug caught: the limit checked after buffering (a 4 GiB prefix allocating or waiting)."""
    limit = 1024 if word == 1025 else MAX_FRAME_LIMIT
    if word == MAX_FRAME_LIMIT:
        limit = MAX_FRAME_LIMIT - 1
    d = LengthDecoder(limit)
    tracemalloc.start()
    try:
        out = d.feed(b"\0\0\0\2ok" + word.to_bytes(4, "big"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == [b"ok"]
    assert d.error == f"frame of {word} bytes exceeds the limit of {limit} bytes"
    assert peak < 256 * 1024, f"rejecting the prefix allocated {peak} bytes"
    assert d.buffered == 0


def test_length_limit_is_inclusive() -> None:
    d = LengthDecoder(5)
    assert d.feed(b"\0\0\0\5abcde") == [b"abcde"]
    assert d.error is None


def test_length_error_flag_is_just_too_large_for_a_server() -> None:
    """Bug caught: a server decoder accepting error frames from clients."""
    d = LengthDecoder(MAX_FRAME_LIMIT)
    assert d.feed(encode_error("x")) == []
    assert d.error is not None


def test_length_large_body_is_received_in_pieces_and_joined_once() -> None:
    """Bug caught: an unfinished large frame re-copied on every recv (quadratic), or a
    body that arrives in one piece copied again."""
    size = 8 << 20
    payload = pattern(size)
    d = LengthDecoder(16 << 20)
    assert d.feed(size.to_bytes(4, "big") + payload[:1000]) == []
    assert d.want == size - 1000  # the caller may now recv(want) into fresh bytes
    rest = payload[1000:]
    pieces = [rest[i : i + 65536] for i in range(0, len(rest), 65536)]
    for piece in pieces[:-1]:
        assert d.body_received(piece) is None
    assert d.body_received(pieces[-1]) == payload
    assert d.want == 0 and d.buffered == 0

    whole = LengthDecoder(16 << 20)
    assert whole.feed(size.to_bytes(4, "big")) == []
    assert whole.want == size
    assert whole.body_received(payload) is payload  # arrived whole: no copy at all


def test_length_large_body_through_feed_is_collected_not_recopied() -> None:
    """Bug caught: a large frame fed in pieces (clients) kept as a growing tail,
    re-copied on every feed (quadratic), or a piece that ends its body and
    starts the next frame losing that frame."""
    size = 8 << 20
    d = LengthDecoder(16 << 20)
    payload = pattern(size)
    data = size.to_bytes(4, "big") + payload + b"\0\0\0\2ok"
    out: list[bytes] = []
    want = size
    for i in range(0, len(data), 65536):
        piece = data[i : i + 65536]
        out += d.feed(piece)
        if out:
            break
        want -= len(piece) - (4 if i == 0 else 0)
        assert d.want == want  # every piece went to the body, none to a tail
    assert out == [payload, b"ok"]
    assert d.want == 0 and d.buffered == 0


@pytest.mark.parametrize("framing", FRAMED)
def test_respond_frames_each_reply_as_encode_does(framing: str) -> None:
    """Bug caught: the fused path's inline framing differing from the encoder
    (a header from the wrong table entry, a large reply cut, a None answered)."""
    kinds: list[Callable[[bytes], Buffer | None]] = [
        lambda m: m[::-1], bytearray, memoryview, lambda m: None, lambda m: m * 3
    ]
    for i, make in enumerate(kinds):
        replies: list[Buffer] = []
        decoder = make_decoder(framing, 1 << 20)
        stream = encode(framing, EDGE_MESSAGES)
        for chunk in (stream[: len(stream) // 3], stream[len(stream) // 3 :]):
            decoder.respond(chunk, make, replies, lambda exc: False)
        expected = [r for r in map(make, EDGE_MESSAGES) if r is not None]
        assert b"".join(replies) == encode(framing, map(bytes, expected)), f"reply kind {i}"


# -- the line framing ------------------------------------------------------------


@pytest.mark.parametrize("via", FEEDERS)
def test_line_crlf_and_lf(via: str) -> None:
    d = LineDecoder(100)
    data = b"a\r\nb\nc\r\r\n\r\n\nmid\rdle\n"
    assert FEEDERS[via](d, [data]) == [b"a", b"b", b"c\r", b"", b"", b"mid\rdle"]


@pytest.mark.parametrize("via", FEEDERS)
def test_line_crlf_split_across_chunks(via: str) -> None:
    """Bug caught: a "\\r" at a chunk end kept in the payload when "\\n" comes next."""
    d = LineDecoder(100)
    assert FEEDERS[via](d, [b"abc\r", b"\ndef\r", b"\n"]) == [b"abc", b"def"]


@HYPOTHESIS
@given(messages=message_lists("line"), data=st.data())
def test_line_crlf_any_split(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(m + b"\r\n" for m in messages)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    assert via_want(LineDecoder(1 << 20), split_at(stream, cuts)) == messages


@pytest.mark.parametrize(
    ("tail", "last"), [(b"bc", [b"bc"]), (b"bc\r", [b"bc"]), (b"", []), (b"\r", [b""])]
)
def test_line_unterminated_last_line_at_eof(tail: bytes, last: list[bytes]) -> None:
    """Bug caught: the last line of a stream without a final newline lost at EOF."""
    d = LineDecoder(100)
    assert d.feed(b"a\n" + tail) == [b"a"]
    assert d.eof() == last
    assert d.eof() == []  # returned once


def test_line_over_limit_detected_before_the_newline() -> None:
    """Bug caught: an endless line buffered until the newline that never comes."""
    d = LineDecoder(1000)
    chunk = b"x" * 65536
    fed = 0
    while d.error is None and fed < 100:
        d.feed(chunk)
        fed += 1
    assert fed == 1
    assert d.buffered == 0


@pytest.mark.parametrize(
    "data", [b"abcd\n", b"abc", b"abcd", b"abcd\r\n"], ids=["lf", "fits", "eof", "crlf"]
)
def test_line_limit(data: bytes) -> None:
    """Bug caught: a line one byte over the limit accepted at EOF (where no "\\n" checks it)."""
    d = LineDecoder(3)
    out = d.feed(data) + d.eof()
    if data == b"abc":
        assert out == [b"abc"] and d.error is None
    else:
        assert out == [] and d.error is not None and "exceeds the limit" in d.error


# -- the raw framing -------------------------------------------------------------


@HYPOTHESIS
@given(data=st.data())
def test_raw_chunks_are_messages(data: st.DataObject) -> None:
    """Bug caught: raw dropping, reordering or over-long messages; recv size ignoring the limit."""
    stream = data.draw(st.binary(min_size=1, max_size=3000))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    limit = data.draw(st.integers(1, 4000))
    via = data.draw(st.sampled_from(sorted(FEEDERS)))
    out = FEEDERS[via](RawDecoder(limit), split_at(stream, cuts))
    assert b"".join(out) == stream
    assert all(0 < len(m) <= limit for m in out)


def test_raw_byte_at_a_time() -> None:
    d = RawDecoder(100)
    assert via_want(d, [b"a", b"b", b"c"]) == [b"a", b"b", b"c"]
    assert d.eof() == []


# -- the client side: error frames ------------------------------------------------


def test_client_decodes_error_frames() -> None:
    """Bug caught: error frames read as huge lengths, or mixed up with replies."""
    stream = (
        encode("length", [b"one"])
        + encode_error("bad thing: é")
        + encode("length", [b""])
        + encode_error("x" * (BODY_BUFFER_MIN + 10))  # received into a body buffer
        + encode("length", [pattern(BODY_BUFFER_MIN * 2)])
    )
    for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        for via in (via_feed, via_want):  # (clients never respond)
            out = via(LengthDecoder(MAX_FRAME_LIMIT, accept_errors=True), chunks)
            assert out == [
                b"one", b"bad thing: \xc3\xa9", b"", b"x" * 4096, pattern(BODY_BUFFER_MIN * 2)
            ]
            assert [isinstance(m, ErrorFrame) for m in out] == [False, True, False, True, False]
            assert out[1].text == "bad thing: é"  # type: ignore[attr-defined]


def test_client_error_frame_over_limit_is_an_error() -> None:
    d = LengthDecoder(10, accept_errors=True)
    assert d.feed(encode_error("x" * 11)) == []
    assert d.error is not None


def test_encode_error_is_cut_to_4096_bytes() -> None:
    """Bug caught: an error frame larger than any sane client limit."""
    data = encode_error("é" * 5000)
    word = int.from_bytes(data[:4], "big")
    assert word & ERROR_FLAG and word ^ ERROR_FLAG == len(data) - 4 == 4096


def test_unknown_framing() -> None:
    with pytest.raises(ValueError, match="unknown framing 'bogus'"):
        make_decoder("bogus", 10)
