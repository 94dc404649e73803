"""gevent echo: StreamServer, one greenlet per connection, cooperative blocking calls.

The idea: code that reads like the threaded server (recv, take frames,
sendall) but runs every connection as a greenlet on gevent's libev/libuv hub,
so a connection costs a greenlet, not a thread.
"""

from __future__ import annotations

import signal
import socket
from typing import Any

import common  # the script's own folder is on sys.path
import gevent
from gevent.event import Event
from gevent.server import StreamServer


def handle(sock: Any, _address: Any) -> None:
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
    finally:
        sock.close()


def main() -> None:
    args = common.parse_args(__doc__ or "")
    common.raise_nofile()
    server = StreamServer((args.host, args.port), handle, backlog=common.BACKLOG)
    server.start()
    common.announce("gevent-streamserver", args.host, server.server_port)
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()
    server.stop(timeout=1)


if __name__ == "__main__":
    main()
