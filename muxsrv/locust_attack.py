"""Attackers for the Locust kit: users that misbehave as attacks do, beside the good users.

``--mux-attack NAME[,NAME...]`` adds ``--mux-attack-users N`` users (10 by
default) of each named attack to whatever the locustfile runs; ``-u`` counts
them too (the attackers are spawned first, the rest are good users).  Names:

==========  ===================  ==================================================
name        class                what each user does, one connection at a time
==========  ===================  ==================================================
slowloris   SlowlorisUser        announces a 1,000-byte frame, then one byte every 2 s
partial     PartialFrameUser     announces just under 16 MiB, sends 15 MB, then waits
drip        DripUser             announces 4 MB, drips it in 1-byte segments, 10,000/s
nonreader   NonReaderUser        pipelines 16 MiB of 64-byte echo requests, reads nothing
oversize    OversizeUser         announces a frame of 2^31-1 bytes, 10 connections/s
garbage     GarbageUser          HTTP, TLS, random bytes, a reset mid-frame, 10/s
churn       ChurnUser            connect, one echo, close (or reset), 50 connections/s
==========  ===================  ==================================================

``all`` names every one.  The numbers are class attributes: subclass one
(``abstract = False``) to change them; ``hold`` is the longest an attacker
keeps one connection (60 s).

What Locust reports: every attacking connection is one request of type
``attack`` (``ATTACK_TYPE``), never the good users' type, named for the attack
and how the connection ended: ``slowloris: closed: frame timeout: message not
complete within 30 s`` (the server's error frame, then its close),
``nonreader: reset`` (dropped without a word, as an output limit does),
``slowloris: survived 60 s`` (no limit held it), ``churn: answered``.  Its
response time is how long the connection lived.  Only what the attacker could
not do (connect) is a failure: a limit that closes an attacker is the server
winning, and the report's good rows show what the attack cost good clients.

The attackers speak length framing (the server's default) over TCP, or TLS
for a ``tls://`` host; they never authenticate (they are the pre-auth
attacker).  Nothing here runs unless ``--mux-attack`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import random
import re
import struct
import sys
import time
from typing import Any, ClassVar, Final

import gevent
from gevent import socket
from locust import User, constant_pacing, events, task
from locust.env import Environment

from .locust_options import OptionError, option, target
from .wire import FrameDecoder, ProtocolError, encode_frame

__all__ = [
    "ATTACKS",
    "ATTACK_TYPE",
    "AttackUser",
    "ChurnUser",
    "DripUser",
    "GarbageUser",
    "NonReaderUser",
    "OversizeUser",
    "PartialFrameUser",
    "SlowlorisUser",
    "attack_names",
]

log = logging.getLogger("muxsrv.locust")

#: The request type of every attacker's report (good users report their handler's name).
ATTACK_TYPE: Final = "attack"
HEADER: Final = struct.Struct(">I")
#: What an attacker keeps of the server's replies to find its last error frame.
RECV_SIZE: Final = 64 * 1024
#: A number in an error text that the attacker's own random bytes chose.
_LONG_NUMBER: Final = re.compile(r"\d{5,}")
#: How long an attacker reads, once it is done, for the server's verdict.
VERDICT_TIMEOUT: Final = 5.0


class Ended(Exception):
    """The server ended the attacking connection (the outcome says how)."""


class Held(Exception):
    """The attacker's ``hold`` ran out with its connection still open."""


class Attempt:
    """One attacking connection: sends, waits, and notes how the server ended it."""

    def __init__(self, sock: socket.socket, hold: float) -> None:
        self.sock = sock
        self.deadline = time.perf_counter() + hold
        self.received = 0
        self.error: str | None = None  # the server's last error frame
        self._decoder: FrameDecoder | None = FrameDecoder()

    def left(self) -> float:
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise Held
        return left

    def send(self, data: bytes) -> None:
        """Send all of it (blocking while the server reads nothing, until the hold ends)."""
        self.sock.settimeout(self.left())
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise Held from None
        except OSError as exc:
            raise Ended(self._broken(exc)) from None

    def send_byte(self) -> None:
        """One byte, its own segment (the attacker's socket has TCP_NODELAY)."""
        self.send(b"x")

    def wait(self, seconds: float, until: int | None = None) -> None:
        """Wait ``seconds`` (at most the hold) for the server to end the connection,
        or (``until``) only until that many bytes have come."""
        end = time.perf_counter() + min(seconds, self.left())
        while (left := end - time.perf_counter()) > 0:
            if until is not None and (self.received >= until or self.error is not None):
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(RECV_SIZE)
            except TimeoutError:
                return
            except OSError as exc:
                raise Ended(self._broken(exc)) from None
            if not data:
                raise Ended(self.closed())
            self._took(data)

    def idle(self, seconds: float) -> None:
        """Wait without reading (a non-reader): only a reset can be seen meanwhile."""
        end = time.perf_counter() + min(seconds, self.left())
        while (left := end - time.perf_counter()) > 0:
            gevent.sleep(min(1.0, left))
            try:
                self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise Ended(self._broken(exc)) from None

    def verdict(self, timeout: float = VERDICT_TIMEOUT) -> str | None:
        """Read until the server closes (its outcome), or None if it has not by ``timeout``."""
        self.deadline = time.perf_counter() + timeout
        try:
            self.wait(timeout)
        except Ended as ended:
            return str(ended)
        except Held:
            pass
        return None

    def closed(self) -> str:
        return f"closed: {self.error}" if self.error else "closed"

    def _broken(self, exc: OSError) -> str:
        self._read_what_is_left()  # the error frame may have come before the reset
        if exc.errno in (errno.ECONNRESET, errno.EPIPE) and self.error:
            return self.closed()  # told why first, then the reset of a write after close
        if exc.errno == errno.ECONNRESET:
            return "reset"
        if exc.errno == errno.EPIPE:
            return "closed"
        return f"error: {exc.strerror or exc}"

    def _read_what_is_left(self) -> None:
        with contextlib.suppress(OSError):
            for _ in range(64):
                data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
                if not data:
                    return
                self._took(data)

    def _took(self, data: bytes) -> None:
        self.received += len(data)
        decoder = self._decoder
        if decoder is None:
            return
        decoder.receive_data(data)
        try:
            while (frame := decoder.maybe_next_frame()) is not None:
                if frame.is_error:
                    self.error = frame.payload.decode("utf-8", "replace")[:100]
        except ProtocolError:
            self._decoder = None  # not frames (a text port): no error text to find


class AttackUser(User):
    """One attacker: opens a connection, misbehaves on it until the server ends it.

    Subclasses set ``attack`` (its --mux-attack name) and write ``misbehave``.
    """

    abstract = True
    attack: ClassVar[str] = "attack"
    #: New connections a second at most, per user (0: one after the other, at once).
    rate: ClassVar[float] = 0.0
    #: The longest one attacking connection is kept open.
    hold: ClassVar[float] = 60.0
    connect_timeout: ClassVar[float] = 10.0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        try:
            self.target = target(self.host or "", None, option(environment, "mux_tls_ca", None))
        except OptionError as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from None
        self.rng = random.Random()
        self._pause = 0.0

    def misbehave(self, attempt: Attempt) -> None:
        raise NotImplementedError

    def wait_time(self) -> float:
        return constant_pacing(1 / self.rate)(self) if self.rate > 0 else 0.0

    @task
    def one_connection(self) -> None:
        start, wall = time.perf_counter(), time.time()
        try:
            sock = self.connect()
        except OSError as exc:
            self.report("connect", start, wall, 0, exc)
            self._pause = min(2.0, self._pause * 2 or 0.05)
            gevent.sleep(self._pause)  # (a refused connect must not spin)
            return
        self._pause = 0.0
        attempt = Attempt(sock, self.hold)
        try:
            self.misbehave(attempt)
            outcome = attempt.verdict() or f"survived {self.hold:g} s"
        except Ended as ended:
            outcome = str(ended)
        except Held:
            outcome = attempt.verdict(1.0) or f"survived {self.hold:g} s"
        finally:
            sock.close()
        self.report(outcome, start, wall, attempt.received)

    def request_name(self, outcome: str) -> str:
        """The name the report shows: the attack, and how its connection ended."""
        return f"{self.attack}: {outcome}"

    def connect(self) -> socket.socket:
        where = self.target
        source = option(self.environment, "mux_attack_from", None)
        sock = socket.create_connection(where.address, timeout=self.connect_timeout,
                                        source_address=(source, 0) if source else None)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if where.tls is not None:
                sock = where.tls.wrap_socket(sock, server_hostname=where.server_hostname)
        except BaseException:
            sock.close()
            raise
        return sock

    def report(self, outcome: str, start: float, wall: float, length: int,
               exc: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=ATTACK_TYPE,
            name=self.request_name(outcome),
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=exc,
            context={},
            start_time=wall,
        )


class SlowlorisUser(AttackUser):
    """A frame announced, then a byte every ``interval``: the inactivity timer never fires."""

    abstract = True
    attack = "slowloris"
    size: ClassVar[int] = 1000
    interval: ClassVar[float] = 2.0

    def misbehave(self, attempt: Attempt) -> None:
        attempt.send(HEADER.pack(self.size) + b"x")
        for _ in range(self.size - 2):  # never the last byte
            attempt.wait(self.interval)
            attempt.send_byte()
        attempt.wait(self.hold)


class PartialFrameUser(AttackUser):
    """Most of a huge frame, then nothing: memory held for a message never finished."""

    abstract = True
    attack = "partial"
    size: ClassVar[int] = 16 * 1024 * 1024 - 1
    body: ClassVar[int] = 15_000_000
    _CHUNK: ClassVar[bytes] = bytes(256 * 1024)

    def misbehave(self, attempt: Attempt) -> None:
        attempt.send(HEADER.pack(self.size))
        left = min(self.body, self.size - 1)
        while left > 0:
            piece = self._CHUNK[:left]
            attempt.send(piece)
            left -= len(piece)
        attempt.wait(self.hold)


class DripUser(AttackUser):
    """A large frame dripped in one-byte segments, ``rate`` a second."""

    abstract = True
    attack = "drip"
    size: ClassVar[int] = 4_000_000
    rate: ClassVar[int] = 10_000
    TICK: ClassVar[float] = 0.01

    def misbehave(self, attempt: Attempt) -> None:
        attempt.send(HEADER.pack(self.size))
        sent, began = 0, time.perf_counter()
        while sent < self.size - 1:
            due = min(self.size - 1, int((time.perf_counter() - began) * self.rate) + 1)
            while sent < due:
                attempt.send_byte()
                sent += 1
            attempt.wait(self.TICK)
        attempt.wait(self.hold)


class NonReaderUser(AttackUser):
    """Pipelined echo requests, ``total`` bytes of them, and not one reply read."""

    abstract = True
    attack = "nonreader"
    payload: ClassVar[int] = 64
    total: ClassVar[int] = 16 * 1024 * 1024

    def misbehave(self, attempt: Attempt) -> None:
        one = encode_frame(b"n" * self.payload)
        batch = one * max(1, 65536 // len(one))
        sent = 0
        while sent < self.total:
            attempt.send(batch)
            sent += len(batch)
        attempt.idle(self.hold)


class OversizeUser(AttackUser):
    """A length prefix far over --max-frame, then a little of the body."""

    abstract = True
    attack = "oversize"
    rate = 10.0
    size: ClassVar[int] = 0x7FFFFFFF

    def misbehave(self, attempt: Attempt) -> None:
        attempt.send(HEADER.pack(self.size) + bytes(100))


class GarbageUser(AttackUser):
    """Whatever is not this protocol: text, TLS, noise, a reset in the middle of a frame."""

    abstract = True
    attack = "garbage"
    rate = 10.0
    KINDS: ClassVar[tuple[str, ...]] = ("http", "tls", "noise", "reset")
    _kind = ""

    def request_name(self, outcome: str) -> str:
        # Noise reads as a random length: one row for all of them, not one per length.
        return f"{self.attack} {self._kind}: {_LONG_NUMBER.sub('N', outcome)}"

    def misbehave(self, attempt: Attempt) -> None:
        kind = self._kind = self.rng.choice(self.KINDS)
        if kind == "http":
            attempt.send(b"GET / HTTP/1.1\r\nHost: muxsrv\r\n\r\n")
        elif kind == "tls":
            attempt.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + self.rng.randbytes(64))
        elif kind == "noise":
            attempt.send(self.rng.randbytes(self.rng.randint(1, 4096)))
        else:  # a frame begun, then an abortive close: the server must forget it cleanly
            attempt.send(HEADER.pack(1000) + self.rng.randbytes(self.rng.randint(0, 999)))
            abort(attempt.sock)
            raise Ended("reset by the attacker")


class ChurnUser(AttackUser):
    """Connections opened and closed as fast as ``rate`` a second: one echo each."""

    abstract = True
    attack = "churn"
    rate = 50.0
    _count = 0

    def misbehave(self, attempt: Attempt) -> None:
        self._count += 1
        reply = encode_frame(b"churn")
        attempt.send(reply)
        attempt.wait(VERDICT_TIMEOUT, until=len(reply))
        if attempt.error is not None:
            raise Ended(attempt.closed())
        if self._count % 2:
            abort(attempt.sock)
        raise Ended("answered")


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a client that crashed or gave up does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- choosing the attackers -------------------------------------------------------------

ATTACKS: Final[dict[str, type[AttackUser]]] = {
    cls.attack: cls
    for cls in (SlowlorisUser, PartialFrameUser, DripUser, NonReaderUser, OversizeUser,
                GarbageUser, ChurnUser)
}


def attack_names(text: str) -> list[str]:
    """--mux-attack: attack names, comma-separated (or ``all``); argparse's error if unknown."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower().replace("-", "").replace("_", "")
        name = name.removesuffix("user")
        name = {"partialframe": "partial"}.get(name, name)
        if name == "all":
            names += [n for n in ATTACKS if n not in names]
        elif name in ATTACKS:
            if name not in names:
                names.append(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown attack {part.strip()!r}; choose from {', '.join(ATTACKS)} or all")
    return names


def _attack_users(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def add_options(parser: Any) -> None:
    parser.add_argument(
        "--mux-attack",
        type=attack_names,
        default=None,
        metavar="NAME[,NAME...]",
        include_in_web_ui=False,
        help=f"Run attackers beside the good users: {', '.join(ATTACKS)}, or all. They report "
        f"under the request type '{ATTACK_TYPE}'. See muxsrv.locust_attack.",
    )
    parser.add_argument(
        "--mux-attack-from",
        metavar="ADDRESS",
        default=None,
        include_in_web_ui=False,
        help="Attackers connect from this local address (e.g. 127.0.0.2 against a server on "
        "127.0.0.1), so --max-conns-per-ip can tell them from the good users.",
    )
    parser.add_argument(
        "--mux-attack-users",
        type=_attack_users,
        default=10,
        metavar="N",
        include_in_web_ui=False,
        help="Users of each attack named by --mux-attack (-u counts them too). Default: 10",
    )


@events.init.add_listener  # type: ignore[untyped-decorator]
def add_attackers(environment: Environment, **_: Any) -> None:
    """Add N users of each --mux-attack to the run, spawned before the good users."""
    names = getattr(environment.parsed_options, "mux_attack", None)
    if not names:
        return
    count = int(getattr(environment.parsed_options, "mux_attack_users", 10))
    host = environment.host or next((c.host for c in environment.user_classes if c.host), None)
    if host is None:
        log.error("--mux-attack needs --host tcp://HOST:PORT")
        sys.exit(2)
    present = {c.__name__ for c in environment.user_classes}
    for name in names:
        base = ATTACKS[name]
        if base.__name__ in present:
            continue
        environment.user_classes.append(type(base.__name__, (base,), {
            "abstract": False, "fixed_count": count, "host": host, "__module__": __name__,
        }))
    users = getattr(environment.parsed_options, "num_users", None)
    if users is not None and users <= count * len(names):
        log.warning("-u %d leaves no good users beside %d attackers (%d of each attack)",
                    users, count * len(names), count)
