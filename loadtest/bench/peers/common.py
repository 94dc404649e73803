"""What every Python peer shares: the command line, the start-up line, and the framing.

The idea: each peer file shows one framework's own idiom for a length-prefixed
echo (4-byte big-endian length, then the payload; the reply is the same frame),
and everything that is not the idiom lives here so the peers stay comparable.
A peer binds 127.0.0.1 (or --host), port 0 by default, raises its soft
RLIMIT_NOFILE to the hard limit, and announces itself on stderr exactly like
muxsrv does: ``NAME: listening on HOST:PORT``.  SIGTERM stops it with status 0.
"""

from __future__ import annotations

import argparse
import resource
import socket
import struct
import sys

HDR = struct.Struct(">I")
MAX_FRAME = 16 << 20  # muxsrv's default --max-frame
BACKLOG = 4096  # connect bursts must never overflow the accept queue
RECV_SIZE = 256 * 1024  # one recv drains many pipelined frames


class FrameTooBig(Exception):
    """A length word above MAX_FRAME: the connection is closed."""


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    return parser.parse_args()


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one; return the new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def announce(name: str, host: str, port: int) -> None:
    print(f"{name}: listening on {host}:{port}", file=sys.stderr, flush=True)


def take_frames(buf: bytearray) -> list[bytes]:
    """Remove every complete frame from the front of `buf`; return their payloads."""
    payloads: list[bytes] = []
    pos = 0
    end = len(buf)
    while end - pos >= 4:
        (size,) = HDR.unpack_from(buf, pos)
        if size > MAX_FRAME:
            raise FrameTooBig(size)
        stop = pos + 4 + size
        if stop > end:
            break
        payloads.append(bytes(buf[pos + 4 : stop]))
        pos = stop
    if pos:
        del buf[:pos]
    return payloads


def frames(payloads: list[bytes]) -> bytes:
    """The replies to `payloads` (echo: each payload unchanged), framed, as one write."""
    pack = HDR.pack
    return b"".join([part for p in payloads for part in (pack(len(p)), p)])


def serve_blocking(sock: socket.socket) -> None:
    """Echo frames on one blocking socket until EOF (threads and greenlets alike)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    try:
        while True:
            data = sock.recv(RECV_SIZE)
            if not data:
                return
            buf += data
            payloads = take_frames(buf)
            if payloads:
                sock.sendall(frames(payloads))
    except (OSError, FrameTooBig):
        return
