"""Tornado echo: TCPServer.handle_stream with IOStream.read_bytes and write.

The idea: Tornado's coroutine idiom.  Each connection awaits the 4-byte header
and then the payload with `read_bytes`, and awaits `write` of the reply (the
future is already done when the kernel took all of it).
"""

from __future__ import annotations

import asyncio
import signal
import socket

import common  # the script's own folder is on sys.path
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.tcpserver import TCPServer


class EchoServer(TCPServer):
    async def handle_stream(self, stream: IOStream, address: tuple[str, int]) -> None:
        stream.set_nodelay(True)
        try:
            while True:
                header = await stream.read_bytes(4)
                (size,) = common.HDR.unpack(header)
                if size > common.MAX_FRAME:
                    break
                payload = await stream.read_bytes(size)
                await stream.write(header + payload)
        except StreamClosedError:
            pass
        finally:
            stream.close()


async def serve() -> None:
    args = common.parse_args(__doc__ or "")
    sockets = bind_sockets(args.port, args.host, family=socket.AF_INET, backlog=common.BACKLOG)
    server = EchoServer(max_buffer_size=2 * common.MAX_FRAME)
    server.add_sockets(sockets)
    common.announce("tornado-iostream", args.host, sockets[0].getsockname()[1])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.stop()


if __name__ == "__main__":
    common.raise_nofile()
    asyncio.run(serve())
