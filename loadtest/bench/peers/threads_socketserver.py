"""socketserver echo: ThreadingTCPServer, one blocking thread per connection.

The idea: the standard library's classic, with its documented knobs set for a
server (daemon threads, address reuse, a large accept queue).  Each handler
thread does recv, takes every complete frame, and answers them with one
sendall; the GIL decides who runs.
"""

from __future__ import annotations

import contextlib
import signal
import socketserver
from types import FrameType

import common  # the script's own folder is on sys.path


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        common.serve_blocking(self.request)


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
