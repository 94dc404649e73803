"""A plugin handler to load-test in the example: reply with the payload's bytes reversed.

It is the function form of a muxsrv handler (one reply per message); serve it with

    python -m muxsrv --handler loadtest.examples.reverse_handler:reverse
"""

from __future__ import annotations


def reverse(payload: bytes) -> bytes:
    return payload[::-1]
