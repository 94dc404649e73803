"""gevent echo: StreamServer, one greenlet per connection, cooperative blocking calls.

The idea: code that reads like the threaded server (recv, take frames,
sendall) but runs every connection as a greenlet on gevent's libev/libuv hub,
so a connection costs a greenlet, not a thread.
"""

from __future__ import annotations

import signal
from typing import Any

import common  # the script's own folder is on sys.path
import gevent
from gevent.event import Event
from gevent.server import StreamServer


def handle(sock: Any, _address: Any) -> None:
    try:
        common.serve_blocking(sock)
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
