"""The command line's UDP options (``--udp``, ``--udp-only``, their bounds) and their checks.

``refusal`` says why a configuration cannot serve datagrams (the CLI exits 2
with it): a handler that declares itself unsafe over UDP (``exec``: a forged
source address would run commands for someone else), and the options whose
protection UDP would silently go around (TLS, token authentication, the
PROXY protocol, which all speak over a TCP connection), and ``--workers``
(the supervisor hands its workers TCP listeners only).
"""

from __future__ import annotations

import argparse

from .options import positive_int, size_or_zero
from .udp import DEFAULT_MAX_PEERS, DEFAULT_MAX_QUEUE, UDP_BATCH

__all__ = ["add_arguments", "mode", "refusal"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--udp", action="store_true",
        help="also serve UDP on the same host and port: each datagram is one message "
             "(framing does not apply), the reply goes back to its sender; a class handler "
             f"gets one instance per peer address; up to {UDP_BATCH} datagrams read per "
             "wake-up")
    group.add_argument("--udp-only", action="store_true", help="serve UDP only (no TCP)")
    add("--udp-max-peers", type=positive_int, default=DEFAULT_MAX_PEERS, metavar="N",
        help="class-handler instances kept for UDP peers; when full, the least recently "
             "active goes (default: 10000); silent ones go after --idle-timeout")
    add("--udp-max-queue", type=size_or_zero, default=DEFAULT_MAX_QUEUE, metavar="BYTES",
        help="replies held while the UDP socket would block; beyond, replies are dropped "
             "and counted (default: 1M; 0: drop at once)")


def mode(options: argparse.Namespace) -> str:
    """``"off"``, ``"also"`` (--udp) or ``"only"`` (--udp-only), as ``Settings.udp``."""
    return "only" if options.udp_only else "also" if options.udp else "off"


def refusal(options: argparse.Namespace, handler_name: str, handler: object) -> str | None:
    """Why these options cannot serve UDP, or None (also None without --udp)."""
    flag = "--udp-only" if options.udp_only else "--udp" if options.udp else None
    if flag is None:
        return None
    unsafe = getattr(handler, "udp_unsafe", None)
    if unsafe:
        return f"handler {handler_name} refuses {flag}: {unsafe}"
    for option, given, why in (
        ("--tls-cert", options.tls_cert, "datagrams would go in plaintext"),
        ("--auth-token-file", options.auth_token_file, "datagrams would skip authentication"),
        ("--proxy-protocol", options.proxy_protocol,
         "datagrams carry no PROXY header: the balancer's address would be the peer"),
    ):
        if given:
            return f"{flag} cannot go with {option}: {why}"
    if options.workers != 1:
        return f"{flag} needs --workers 1 (the supervisor hands its workers TCP listeners only)"
    return None
