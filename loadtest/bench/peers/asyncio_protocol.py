"""asyncio (or uvloop) Protocol echo: callbacks, a private bytearray, one write per read.

The idea: the lowest-level asyncio idiom.  `data_received` appends to a buffer,
takes every complete frame, and answers them all with one `transport.write`.
Flow control is the transport's: when its write buffer is over the high-water
mark, `pause_writing` stops reading until `resume_writing`.
Run with ``--loop uvloop`` for the same protocol on uvloop's event loop, and
with ``--tls-cert FILE --tls-key FILE`` for the same over TLS: the loop's own
``ssl`` transport (``create_server(ssl=...)``), the protocol unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import ssl
from typing import cast

import common  # the script's own folder is on sys.path


class EchoProtocol(asyncio.Protocol):
    _transport: asyncio.Transport  # set by connection_made, before any other callback

    def __init__(self) -> None:
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            payloads = common.take_frames(self._buf)
        except common.FrameTooBig:
            self._transport.close()
            return
        if payloads:
            self._transport.write(common.frames(payloads))

    def pause_writing(self) -> None:
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._transport.resume_reading()


async def serve(args: argparse.Namespace, name: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # as muxsrv's
        context.load_cert_chain(args.tls_cert, args.tls_key)
    server = await loop.create_server(
        EchoProtocol, args.host, args.port, family=socket.AF_INET, backlog=common.BACKLOG,
        ssl=context,
    )
    port = server.sockets[0].getsockname()[1]
    common.announce(name, args.host, port)
    await stop
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate")
    parser.add_argument("--tls-key", metavar="FILE", help="its PEM key (if not in --tls-cert)")
    args = parser.parse_args()
    common.raise_nofile()
    suffix = "-tls" if args.tls_cert else ""
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args, "uvloop-protocol" + suffix))
    else:
        asyncio.run(serve(args, "asyncio-protocol" + suffix))


if __name__ == "__main__":
    main()
