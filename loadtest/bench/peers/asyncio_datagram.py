"""asyncio (or uvloop) DatagramProtocol echo: each datagram sent back to its sender.

The idea: asyncio's own idiom for UDP.  ``datagram_received`` gets one
datagram (the selector loop reads one per wake-up of the socket) and answers
it with ``transport.sendto``.  Run with ``--loop uvloop`` for the same
protocol on uvloop's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from typing import Any, cast

import common  # the script's own folder is on sys.path


class EchoDatagram(asyncio.DatagramProtocol):
    _transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._transport.sendto(data, addr)


async def serve(args: argparse.Namespace, name: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    transport, _ = await loop.create_datagram_endpoint(
        EchoDatagram, local_addr=(args.host, args.port), family=socket.AF_INET)
    port = transport.get_extra_info("sockname")[1]
    common.announce(name, args.host, port)
    await stop
    transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args, "uvloop-datagram"))
    else:
        asyncio.run(serve(args, "asyncio-datagram"))


if __name__ == "__main__":
    main()
