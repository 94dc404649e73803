"""socketserver echo: ThreadingTCPServer, one blocking thread per connection.

The idea: the standard library's classic, with its documented knobs set for a
server (daemon threads, address reuse, a large accept queue).  Each handler
thread does recv, takes every complete frame, and answers them with one
sendall; the GIL decides who runs.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import socketserver
from types import FrameType

import common  # the script's own folder is on sys.path


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        try:
            while True:
                data = sock.recv(common.RECV_SIZE)
                if not data:
                    return
                buf += data
                payloads = common.take_frames(buf)
                if payloads:
                    sock.sendall(common.frames(payloads))
        except (OSError, common.FrameTooBig):
            return


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = common.BACKLOG


class Stop(Exception):
    """Raised by the SIGTERM handler to leave serve_forever."""


def on_term(signum: int, frame: FrameType | None) -> None:
    raise Stop


def main() -> None:
    args = common.parse_args(__doc__ or "")
    common.raise_nofile()
    signal.signal(signal.SIGTERM, on_term)
    with EchoServer((args.host, args.port), EchoHandler) as server:
        common.announce("threads-socketserver", args.host, server.server_address[1])
        with contextlib.suppress(Stop):
            server.serve_forever()


if __name__ == "__main__":
    main()
