"""The Locust kit moved into the package: ``from muxsrv.locust import MuxUser``.

This name stays for locustfiles written against it; everything is re-exported.
"""

from __future__ import annotations

from muxsrv.locust import (
    Check,
    Done,
    MuxClient,
    MuxUser,
    RepliesCheck,
    ServerError,
    WrongReply,
    parse_host,
    raise_open_file_limit,
)

__all__ = [
    "Check",
    "Done",
    "MuxClient",
    "MuxUser",
    "RepliesCheck",
    "ServerError",
    "WrongReply",
    "parse_host",
    "raise_open_file_limit",
]
