"""Load-test muxsrv's built-in handlers with Locust: every reply checked, every miss counted.

    python -m muxsrv --handler echo &
    locust -f loadtest/locustfile.py --headless -u 100 -r 50 -t 30s --host tcp://127.0.0.1:9999

(``--host udp://127.0.0.1:9999`` for a server with --udp: one datagram per message.)

One user class, `ScenarioUser`, runs the scenario named by --mux-handler
(see loadtest/scenarios.py) back to back: build a payload, send it, check the
reply.  A wrong reply, an error frame or a dropped connection is a Locust
failure, so it shows in the failure count, `--csv` and `--html`; the goodbye
of a draining server is not (the requests in flight are resent: see muxsrv.locust).

Options, on Locust's own command line (and in its web UI):
  --mux-handler echo|upper|exec  scenario; must match the server's --handler (echo)
  --mux-size BYTES               payload size for echo and upper, 0 to 64M (64)
  --mux-pipeline N               requests in flight per user, 1 or more (1)
  --mux-timeout SECONDS          per batch, connect included, more than 0 (30);
                                 over udp://, a reply later than this is a lost datagram

An impossible value (--mux-timeout 0, --mux-pipeline 0, --mux-size -1, an
unknown --mux-handler) is refused with one line and exit status 2, before any
user starts, as muxsrv refuses its own options.

Thousands of users need as many open files: the soft limit is raised to the
hard limit on import.  Use --processes N (or --master and --worker) to spread
the users over all cores.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path
from typing import Any

# Locust puts the current directory on sys.path, so `loadtest` imports when
# run from the repository root; this makes the file work from anywhere else.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locust import events, task
from locust.env import Environment
from locust.runners import MasterRunner

from loadtest.scenarios import SCENARIOS
from loadtest.wire import DEFAULT_MAX_PAYLOAD
from muxsrv.locust import MuxUser, parse_host, raise_open_file_limit
from muxsrv.options import parse_size, positive_int

DEFAULT_HOST = "tcp://127.0.0.1:9999"  # where `python -m muxsrv` listens by default
# Descriptors a Locust process needs besides one socket per user: its own
# files, the web UI, the master-worker link.
SPARE_FILES = 100
# The largest --mux-size: a bigger reply than this is, to the client's decoder,
# a corrupt stream (muxsrv.wire); the server's own ceiling (2^31-1) is higher.
MAX_SIZE = DEFAULT_MAX_PAYLOAD

log = logging.getLogger(__name__)
OPEN_FILES = raise_open_file_limit()


def payload_size(text: str) -> int:
    """--mux-size: bytes (K, M suffixes as the server's --max-frame), up to the largest
    reply this client reads."""
    value = parse_size(text)
    if not 0 <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be from 0 to {MAX_SIZE >> 20}M bytes (the largest reply the load test reads)"
        )
    return value


def positive_seconds(text: str) -> float:
    """--mux-timeout: a finite number of seconds, more than 0 (0 would fail every batch)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number of seconds, more than 0")
    return value


# Each type raises argparse.ArgumentTypeError, which Locust's parser reports as
# one line, `locust: error: argument --mux-...: <why>`, and exit status 2,
# before any user starts: the way muxsrv refuses its own options.
@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def add_options(parser: Any) -> None:
    parser.add_argument(
        "--mux-handler",
        choices=sorted(SCENARIOS),
        default="echo",
        help="Scenario to run; the server must run the handler of that name. Default: echo",
    )
    parser.add_argument(
        "--mux-size",
        type=payload_size,
        default=64,
        metavar="BYTES",
        help="Payload size for the echo and upper scenarios, 0 to 64M; the server's "
        "--max-frame must allow it. Default: 64",
    )
    parser.add_argument(
        "--mux-pipeline",
        type=positive_int,
        default=1,
        metavar="N",
        help="Requests each user keeps in flight (sent together, replies read in order), "
        "at least 1. Default: 1",
    )
    parser.add_argument(
        "--mux-timeout",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="A batch that takes longer fails and its connection is dropped; more than 0. "
        "Default: 30",
    )


@events.init.add_listener  # type: ignore[untyped-decorator]
def check_setup(environment: Environment, **_: Any) -> None:
    """Refuse a malformed --host now rather than once per user; warn about too few files."""
    if environment.host:
        try:
            parse_host(environment.host)
        except ValueError as exc:
            log.error("%s", exc)
            sys.exit(2)
    options = environment.parsed_options
    users = getattr(options, "num_users", None)
    if OPEN_FILES is None or not users or isinstance(environment.runner, MasterRunner):
        return  # a master holds no user sockets
    processes = getattr(options, "processes", None) or 1
    share = -(-users // processes) if processes > 0 else users
    if share + SPARE_FILES > OPEN_FILES:
        log.warning(
            "up to %d users here need about %d open files, but this process may open "
            "only %d: raise the hard limit (ulimit -Hn) or add --processes/--worker",
            share,
            share + SPARE_FILES,
            OPEN_FILES,
        )


class ScenarioUser(MuxUser):
    """Runs the --mux-handler scenario: build a payload, send it, check the reply."""

    host = DEFAULT_HOST

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        self.scenario = SCENARIOS[getattr(options, "mux_handler", "echo")]
        self.size = int(getattr(options, "mux_size", 64))
        self.in_flight = max(1, int(getattr(options, "mux_pipeline", 1)))
        self.handler = self.scenario.handler
        self.timeout = float(getattr(options, "mux_timeout", 30.0))
        self.rng = random.Random()  # seeded from os.urandom: users differ
        super().__init__(environment)

    @task
    def send(self) -> None:
        payloads = [self.scenario.make_payload(self.rng, self.size) for _ in range(self.in_flight)]
        self.client.pipeline(
            payloads, name=self.scenario.request_name(self.size), check=self.scenario.check
        )
