"""asyncio streams echo: one coroutine per connection, readexactly then write and drain.

The idea: the idiom the asyncio docs teach.  Each connection is a coroutine
that reads a 4-byte header and then the payload with `readexactly`, writes the
reply, and awaits `drain` (which returns at once unless the write buffer is
over its high-water mark).
"""

from __future__ import annotations

import asyncio
import signal
import socket

import common  # the script's own folder is on sys.path


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(4)
            (size,) = common.HDR.unpack(header)
            if size > common.MAX_FRAME:
                break
            payload = await reader.readexactly(size)
            writer.write(header + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve() -> None:
    args = common.parse_args(__doc__ or "")
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    server = await asyncio.start_server(
        handle, args.host, args.port, family=socket.AF_INET, backlog=common.BACKLOG
    )
    common.announce("asyncio-streams", args.host, server.sockets[0].getsockname()[1])
    await stop
    server.close()


if __name__ == "__main__":
    common.raise_nofile()
    asyncio.run(serve())
