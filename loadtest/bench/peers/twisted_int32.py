"""Twisted echo: Int32StringReceiver on the epoll reactor.

The idea: Twisted's own framing protocol does the parsing; the echo is one
line, `stringReceived` calling `sendString`.  MAX_LENGTH is raised to muxsrv's
16 MiB default so bulk messages fit.
"""

from __future__ import annotations

from typing import Any

import common  # the script's own folder is on sys.path
from twisted.internet import epollreactor

epollreactor.install()  # type: ignore[no-untyped-call]

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402
from twisted.protocols.basic import Int32StringReceiver  # noqa: E402


class Echo(Int32StringReceiver):
    MAX_LENGTH = common.MAX_FRAME

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def stringReceived(self, string: bytes) -> None:
        self.sendString(string)  # type: ignore[no-untyped-call]


def main() -> None:
    args = common.parse_args(__doc__ or "")
    common.raise_nofile()
    the_reactor: Any = reactor  # zope interfaces do not type-check as classes
    port = the_reactor.listenTCP(
        args.port, Factory.forProtocol(Echo), backlog=common.BACKLOG, interface=args.host
    )
    common.announce("twisted-int32", args.host, port.getHost().port)
    the_reactor.run()  # the reactor stops itself on SIGTERM


if __name__ == "__main__":
    main()
