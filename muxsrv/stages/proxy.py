"""The PROXY protocol header (HAProxy's ``doc/proxy-protocol.txt``, v1 and v2) as a stage.

A load balancer in front of the server opens its own connection to it, so
the socket's peer is the balancer.  With the PROXY protocol the balancer
starts every connection with a header naming the real client; this stage,
the one nearest the socket, reads that header and nothing else:

* the header may arrive a byte at a time; the stage decides from its first
  bytes which version it is (``PROXY `` for v1, the 12-byte binary signature
  for v2) and fails as soon as a byte cannot belong to a header: a receiver
  must not guess whether a header is there, so none at all is an error too;
* v1 is a text line of at most ``MAX_V1`` bytes (``TCP4``, ``TCP6`` or
  ``UNKNOWN``); v2 is binary, at most ``MAX_V2`` bytes in all, TLVs
  included (TLVs are skipped: nothing here needs them);
* once the header is complete the stage leaves the path and returns the bytes
  after it (a TLS ClientHello, the first frame), none lost, however split;
* ``peer`` is then the client's address in the shape ``getpeername()`` gives
  for its family: ``(host, port)`` for IPv4, ``(host, port, 0, 0)`` for IPv6.
  A v2 ``LOCAL`` command, a v1 ``UNKNOWN``, or a v2 address family that is not
  IP (``AF_UNIX``, ``AF_UNSPEC``) carries no client: ``peer`` is then the
  socket's own peer (given at construction), and ``health_check`` is true for
  ``LOCAL`` and ``UNKNOWN`` (the balancer checking on us: not worth the log);
* ``refusal``, when given, is asked about the final peer (protected mode, a
  lock-out); a reason it returns becomes the stage's error, told to the peer.

The stage never connects anywhere; an address in a header is only a name.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Final

from . import Stage

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["MAX_V1", "MAX_V2", "PROXY_TIMEOUT", "V2_SIGNATURE", "ProxyHeader", "v1_header",
           "v2_header"]

#: The longest v1 line, CRLF included (the spec's worst case, TCP6 with 5-digit ports).
MAX_V1: Final = 107
#: The longest v2 header, TLVs included (nginx's cap; HAProxy sends far less).
MAX_V2: Final = 4096
#: A header not complete this long after the connection was accepted: closed.
PROXY_TIMEOUT: Final = 5.0

V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED: Final = 16  # signature, version and command, family and protocol, length
_LOCAL: Final = 0x20
_PROXY: Final = 0x21
_TCP4: Final = 0x11
_TCP6: Final = 0x21


class ProxyHeader(Stage):
    """One connection's PROXY header parser: ready (and done) once the header is read."""

    ready = False

    def __init__(self, socket_peer: Any = None,
                 refusal: Callable[[Any], str | None] | None = None) -> None:
        self._socket_peer = socket_peer
        self._refusal = refusal
        self._buffer = b""
        #: The client's address once the header is read (the socket's peer for LOCAL).
        self.peer: Any = None
        #: A LOCAL or UNKNOWN header: the balancer's own health check.
        self.health_check = False
        #: The timeout's timer (anything with ``cancel()``), cancelled once read or failed.
        self.timer: Any = None

    def receive(self, data: bytes) -> bytes:
        if self.error is not None:
            return b""  # nothing passes a broken header
        if self.done:
            return data
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        end = self._v1(buffer) if buffer[:1] == V1_PREFIX[:1] else self._v2(buffer)
        if self.error is not None:
            self._stop_timer()
            return b""
        if end is None:
            self._buffer = buffer
            return b""
        self._finish()
        return buffer[end:] if self.error is None else b""

    def _fail(self, reason: str) -> None:
        self.error = f"bad PROXY protocol header: {reason}"

    # -- v1: "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n" ---------------

    def _v1(self, buffer: bytes) -> int | None:
        if not buffer.startswith(V1_PREFIX[:len(buffer)]):
            self._fail("neither a v1 nor a v2 signature")
            return None
        end = buffer.find(b"\r\n", 0, MAX_V1)
        if end < 0:
            if len(buffer) >= MAX_V1:
                self._fail(f"a v1 line longer than {MAX_V1} bytes")
            elif b"\n" in buffer:
                self._fail("a v1 line not ended by CRLF")
            return None
        fields = buffer[:end].split(b" ")
        if fields[1:2] == [b"UNKNOWN"]:
            self.health_check = True  # the rest of the line is to be ignored
            return end + 2
        if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
            self._fail("a v1 line is PROXY TCP4|TCP6 SRC DST SPORT DPORT, or PROXY UNKNOWN")
            return None
        kind = ipaddress.IPv4Address if fields[1] == b"TCP4" else ipaddress.IPv6Address
        try:
            source = kind(fields[2].decode("ascii"))
            kind(fields[3].decode("ascii"))
            port = _port(fields[4])
            _port(fields[5])
        except ValueError:
            self._fail("a v1 address or port that is not one")
            return None
        self.peer = _shape(source, port)
        return end + 2

    # -- v2: signature, command, family, length, addresses, TLVs -------------

    def _v2(self, buffer: bytes) -> int | None:
        if not buffer.startswith(V2_SIGNATURE[:len(buffer)]):
            self._fail("neither a v1 nor a v2 signature")
            return None
        if len(buffer) < V2_FIXED:
            return None
        command, family = buffer[12], buffer[13]
        size = V2_FIXED + int.from_bytes(buffer[14:16], "big")
        if command not in (_LOCAL, _PROXY):
            self._fail(f"v2 version and command byte {command:#04x} (0x20 LOCAL, 0x21 PROXY)")
            return None
        if size > MAX_V2:
            self._fail(f"a v2 header of {size} bytes (at most {MAX_V2})")
            return None
        if len(buffer) < size:
            return None
        if command == _LOCAL:
            self.health_check = True  # addresses, if any, are to be ignored
            return size
        body = buffer[V2_FIXED:size]
        if family == _TCP4 and len(body) >= 12:
            address: Any = ipaddress.IPv4Address(body[0:4])
            self.peer = _shape(address, int.from_bytes(body[8:10], "big"))
        elif family == _TCP6 and len(body) >= 36:
            address = ipaddress.IPv6Address(body[0:16])
            self.peer = _shape(address, int.from_bytes(body[32:34], "big"))
        elif family in (_TCP4, _TCP6):
            self._fail("a v2 header too short for its addresses")
            return None
        elif family >> 4 not in (0, 3):  # AF_UNSPEC, AF_UNIX: the socket's own addresses
            self._fail(f"v2 family and protocol byte {family:#04x} (not a TCP stream)")
            return None
        return size

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _finish(self) -> None:
        self._stop_timer()
        if self.peer is None:
            self.peer = self._socket_peer
        self.ready = True
        self.done = True
        if self._refusal is not None:
            reason = self._refusal(self.peer)
            # A TLS stage after us says it inside TLS, once its handshake is done.
            if reason is not None and not self.hand_refusal(reason):
                self.error = reason
                self.tell_peer = True


def _port(field: bytes) -> int:
    if not (field.isdigit() and len(field) <= 5 and (field == b"0" or field[:1] != b"0")):
        raise ValueError(field)
    port = int(field)
    if port > 65535:
        raise ValueError(field)
    return port


def _shape(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> Any:
    """``getpeername()``'s shape for the address's family."""
    if isinstance(address, ipaddress.IPv4Address):
        return (str(address), port)
    return (str(address), port, 0, 0)


# -- building headers (for tests and for clients that speak through a balancer) --


def v1_header(source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    """A v1 header line for a TCP connection from ``source`` to ``dest``."""
    kind = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {kind} {source[0]} {dest[0]} {source[1]} {dest[1]}\r\n").encode("ascii")


def v2_header(source: tuple[str, int] | None, dest: tuple[str, int] | None = None,
              tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY over TCP from ``source`` to ``dest``; ``source`` None: LOCAL."""
    if source is None:
        return V2_SIGNATURE + bytes([_LOCAL, 0]) + len(tlvs).to_bytes(2, "big") + tlvs
    dest = dest if dest is not None else (source[0], 0)
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(dest[0])
    family = _TCP4 if src.version == 4 else _TCP6
    body = (src.packed + dst.packed + source[1].to_bytes(2, "big")
            + dest[1].to_bytes(2, "big") + tlvs)
    return V2_SIGNATURE + bytes([_PROXY, family]) + len(body).to_bytes(2, "big") + body
