"""Built-in load-test scenarios: what to send each handler, and how to judge its reply.

A scenario is two pure functions: `make_payload(rng, size)` builds a request,
`check(payload, reply)` raises `WrongReply` unless the reply is exactly what
the handler must answer.  Nothing here does I/O or imports Locust, so the
checks are tested with plain bytes and are reused by the Locust user as is.

- echo:  random bytes; the reply must be byte-identical.
- upper: valid UTF-8 text (with letters whose upper case changes length) or
         arbitrary bytes; the reply must equal `expected_upper(payload)`.
- exec:  the command line `echo <token>`; the reply must report exit code 0,
         no timeout, no truncation, and stdout `<token>\\n`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.wire import WrongReply, parse_exec_reply

# Letters whose upper case is longer or shorter than they are (ß, ŉ, ﬁ, dotless i),
# several scripts, a 4-byte emoji, and plain ASCII, so a server that
# upper-cases bytes instead of text, or truncates to the input length, fails.
UPPER_ALPHABET = "abcxyzABC019 .,äéøßŉﬁıσςжπ€日🙂"
EXEC_TOKEN_BYTES = 8  # 16 hex digits: unique per request, short enough for any command line


@dataclass(frozen=True, slots=True)
class Scenario:
    """How to load-test one handler."""

    handler: str  # the server's --handler, and Locust's request type
    label: str  # what a request carries, for Locust's Name column
    make_payload: Callable[[random.Random, int], bytes]
    check: Callable[[bytes, bytes], None]
    uses_size: bool = True  # False when --mux-size does not shape the payload

    def request_name(self, size: int) -> str:
        return f"{self.label} {size} B" if self.uses_size else self.label


def expect_equal(expected: bytes, reply: bytes, what: str = "reply") -> None:
    """Raise WrongReply unless `reply == expected`.

    The message names lengths but no offsets, so Locust's failure table groups
    identical mistakes into one row instead of one row per request.
    """
    if reply != expected:
        if len(reply) == len(expected):
            raise WrongReply(f"{what} differs from expected ({len(reply)} bytes, same length)")
        raise WrongReply(f"{what} has {len(reply)} bytes, expected {len(expected)}")


def expected_upper(payload: bytes) -> bytes:
    """What the upper handler must answer: text upper-casing if UTF-8, else ASCII-only."""
    try:
        return payload.decode("utf-8").upper().encode("utf-8")
    except UnicodeDecodeError:
        return payload.upper()


def random_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def random_text_or_bytes(rng: random.Random, size: int) -> bytes:
    """Half the time `size` bytes of valid UTF-8 text, half the time random bytes."""
    if rng.random() < 0.5:
        return rng.randbytes(size)
    # Every character is at least one byte, so `size` characters are enough;
    # cutting at `size` bytes may split the last character, and decoding with
    # "ignore" drops that half, which the ASCII padding then makes up for.
    text = "".join(rng.choices(UPPER_ALPHABET, k=size)).encode("utf-8")
    whole = text[:size].decode("utf-8", "ignore").encode("utf-8")
    return whole + b"a" * (size - len(whole))


def echo_command(rng: random.Random, size: int) -> bytes:
    return b"echo " + rng.randbytes(EXEC_TOKEN_BYTES).hex().encode("ascii")


def check_echo(payload: bytes, reply: bytes) -> None:
    expect_equal(payload, reply, "echo reply")


def check_upper(payload: bytes, reply: bytes) -> None:
    expect_equal(expected_upper(payload), reply, "upper reply")


def check_exec_echo(payload: bytes, reply: bytes) -> None:
    result = parse_exec_reply(reply)
    if result.timed_out:
        raise WrongReply("exec reports a timeout for echo")
    if result.exit_code != 0:
        raise WrongReply(f"exec reports exit code {result.exit_code} for echo")
    if result.truncated:
        raise WrongReply("exec reports truncated output for echo")
    token = payload.split(b" ", 1)[1]
    expect_equal(token + b"\n", result.stdout, "exec stdout")


SCENARIOS: dict[str, Scenario] = {
    s.handler: s
    for s in (
        Scenario("echo", "random bytes", random_bytes, check_echo),
        Scenario("upper", "text or bytes", random_text_or_bytes, check_upper),
        Scenario("exec", "echo <token>", echo_command, check_exec_echo, uses_size=False),
    )
}
