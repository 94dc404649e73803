"""The TLS stage alone: a real ssl client SSLObject on memory BIOs, bytes shuttled by hand."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import pytest
from tls_certs import Certs

from muxsrv.stages.tls import TLSStage, looks_like_tls
from muxsrv.tls import TLSConfigError, load_context


class Client:
    """The client side of a TLS session on memory BIOs."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def out(self) -> bytes:
        return self.outgoing.read()

    def feed(self, data: bytes) -> None:
        self.incoming.write(data)

    def read_all(self) -> bytes:
        chunks = []
        try:
            while chunk := self.obj.read(65536):
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        return b"".join(chunks)


def server_stage(certs: Certs, ca: bool = False) -> TLSStage:
    context = load_context(str(certs.server_cert), str(certs.server_key),
                           str(certs.ca) if ca else None)
    return TLSStage(context)


def shuttle(client: Client, stage: TLSStage,
            split: Callable[[bytes], list[bytes]] = lambda b: [b] if b else []) -> bytes:
    """Run the handshake to its end; what plaintext the stage passed on."""
    passed = b""
    for _ in range(20):
        try:
            client.obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        for piece in split(client.out()):
            passed += stage.receive(piece)
            assert stage.error is None, stage.error
        client.feed(stage.send(b""))
        if done and stage.ready:
            return passed
    raise AssertionError("the handshake did not finish")


def byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("split", [None, byte_at_a_time], ids=["whole", "bytewise"])
def test_handshake_and_echo(certs: Certs, version: ssl.TLSVersion,
                            split: Callable[[bytes], list[bytes]] | None) -> None:
    stage = server_stage(certs)
    client = Client(certs.client_context(version))
    calls: list[str] = []
    stage.on_handshake = lambda: calls.append("done")
    assert not stage.ready
    shuttle(client, stage, split) if split else shuttle(client, stage)
    assert stage.ready and calls == ["done"]
    assert stage.version == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
    assert stage.peer_cert is None
    client.obj.write(b"ping")
    data = client.out()
    got = b"".join(stage.receive(piece) for piece in (split or (lambda b: [b]))(data))
    assert got == b"ping"
    client.feed(stage.send(b"pong"))
    assert client.read_all() == b"pong"


def test_pipelined_records_all_drained(certs: Certs) -> None:
    """The classic trap: many records in one receive all come out, not just the first."""
    stage = server_stage(certs)
    client = Client(certs.client_context())
    shuttle(client, stage)
    messages = [bytes([i % 256]) * (1000 + i) for i in range(200)]
    for message in messages:
        client.obj.write(message)  # one record each
    assert stage.receive(client.out()) == b"".join(messages)
    big = b"z" * 300_000  # more than one READ_SIZE and many records
    client.obj.write(big)
    assert stage.receive(client.out()) == big


def test_close_notify_is_a_half_close(certs: Certs) -> None:
    stage = server_stage(certs)
    client = Client(certs.client_context())
    shuttle(client, stage)
    client.obj.write(b"last")
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.unwrap()  # our close_notify goes; theirs is awaited
    assert stage.receive(client.out()) == b"last"
    assert stage.eof and stage.ending == "clean" and stage.error is None
    client.feed(stage.send(b"reply owed"))  # replies still go after the peer's close_notify
    assert client.read_all() == b"reply owed"
    client.feed(stage.finish())
    client.obj.unwrap()  # the server's close_notify arrived: no exception
    assert stage.finish() == b""  # once


def test_truncated_close_is_not_an_error(certs: Certs) -> None:
    stage = server_stage(certs)
    client = Client(certs.client_context())
    shuttle(client, stage)
    stage.receive_eof()
    assert stage.ending == "truncated" and stage.error is None and not stage.eof
    assert stage.finish() == b""  # nobody left to hear a close_notify


@pytest.mark.parametrize("first", [b"GET / HTTP/1.0\r\n\r\n", b"\x00\x00\x00\x05hello"])
def test_plaintext_is_refused(certs: Certs, first: bytes) -> None:
    stage = server_stage(certs)
    assert stage.receive(first) == b""
    assert stage.error is not None and "not TLS" in stage.error
    assert stage.finish() == b""


def test_sends_before_the_handshake_wait_for_it(certs: Certs) -> None:
    stage = server_stage(certs)
    client = Client(certs.client_context())
    assert stage.send(b"early") == b""
    shuttle(client, stage)
    client.feed(stage.send(b""))
    assert client.read_all() == b"early"


def test_mutual_tls(certs: Certs) -> None:
    stage = server_stage(certs, ca=True)
    client = Client(certs.client_context(with_cert=True))
    shuttle(client, stage)
    assert stage.peer_cert is not None
    assert ((("commonName", "client"),) in stage.peer_cert["subject"])


def test_mutual_tls_without_a_certificate_fails(certs: Certs) -> None:
    stage = server_stage(certs, ca=True)
    client = Client(certs.client_context(ssl.TLSVersion.TLSv1_2))
    with pytest.raises(AssertionError, match="TLS handshake failed"):
        shuttle(client, stage)
    assert not stage.ready


def test_looks_like_tls() -> None:
    assert looks_like_tls(b"\x16\x03\x01\x02\x00")
    assert not looks_like_tls(b"\x00\x00\x00\x05")
    assert not looks_like_tls(b"\x16")


def test_bad_files(certs: Certs, tmp_path: object) -> None:
    with pytest.raises(TLSConfigError, match="no such file"):
        load_context("/nonexistent/cert.pem")
    with pytest.raises(TLSConfigError, match="cannot load the certificate"):
        load_context(str(certs.ca))  # a certificate without its key
    load_context(str(certs.server_combined))  # the key may sit in the certificate file


def test_length_decoder_says_looks_like_tls() -> None:
    from muxsrv.framing import make_decoder
    from muxsrv.length import TLS_ON_PLAINTEXT

    decoder = make_decoder("length", 16 << 20)
    assert decoder.feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03") == []
    assert decoder.error == TLS_ON_PLAINTEXT
    other = make_decoder("length", 16 << 20)
    other.feed(b"\x7f\x00\x00\x00")
    assert other.error is not None and "exceeds the limit" in other.error


@pytest.mark.parametrize("cut", [1, 5, 40, -1], ids=["1", "5", "40", "all-but-1"])
def test_records_and_a_partial_one_in_one_read(certs: Certs, cut: int) -> None:
    """Reading stops once nothing is left inside OpenSSL, without waiting for an
    SSLWantReadError: no whole record may be left behind, whatever the cut."""
    stage = server_stage(certs)
    client = Client(certs.client_context())
    shuttle(client, stage)
    records = []
    for i in range(4):
        client.obj.write(b"%d" % i * (3000 + i))
        records.append(client.out())
    head, tail = records[3][:cut], records[3][cut:]
    got = stage.receive(b"".join(records[:3]) + head)
    assert got == b"".join(b"%d" % i * (3000 + i) for i in range(3))
    assert stage.receive(tail) == b"3" * 3003


def test_large_buffers_go_through_unjoined_and_in_order(certs: Certs) -> None:
    from muxsrv.stages import SEND_UNJOINED, StagePath

    stage = server_stage(certs)
    client = Client(certs.client_context())
    shuttle(client, stage)
    path = StagePath([stage])
    big = bytearray(b"b" * (SEND_UNJOINED * 3 + 7))
    out = [b"\x00\x01", memoryview(big), b"tail", b"more", bytes(SEND_UNJOINED)]
    sent = path.send(out)
    assert sent is not None
    for ciphertext in sent:
        client.feed(bytes(ciphertext))
    assert client.read_all() == b"".join(bytes(part) for part in out)
