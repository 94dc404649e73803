"""Load-test muxsrv's built-in handlers with Locust: every reply checked, every miss counted.

    python -m muxsrv --handler echo &
    locust -f loadtest/locustfile.py --headless -u 100 -r 50 -t 30s --host tcp://127.0.0.1:9999

One user class, `ScenarioUser`, runs the scenario named by --mux-handler
(see loadtest/scenarios.py) back to back: build a payload, send it, check the
reply.  A wrong reply, an error frame or a dropped connection is a Locust
failure, so it shows in the failure count, `--csv` and `--html`; the goodbye
of a draining server is not (the requests in flight are resent: see muxuser).

Options, on Locust's own command line (and in its web UI):
  --mux-handler echo|upper|exec  scenario; must match the server's --handler (echo)
  --mux-size BYTES               payload size for echo and upper (64)
  --mux-pipeline N               requests in flight per user (1)
  --mux-timeout SECONDS          per batch, connect included (30)

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

from loadtest.muxuser import MuxUser, parse_host, raise_open_file_limit
from loadtest.scenarios import SCENARIOS

DEFAULT_HOST = "tcp://127.0.0.1:9999"  # where `python -m muxsrv` listens by default
# Descriptors a Locust process needs besides one socket per user: its own
# files, the web UI, the master-worker link.
SPARE_FILES = 100

log = logging.getLogger(__name__)
OPEN_FILES = raise_open_file_limit()


def _at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


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
        type=_at_least(0),
        default=64,
        metavar="BYTES",
        help="Payload size for the echo and upper scenarios. Default: 64",
    )
    parser.add_argument(
        "--mux-pipeline",
        type=_at_least(1),
        default=1,
        metavar="N",
        help="Requests each user keeps in flight (sent together, replies read in order). "
        "Default: 1",
    )
    parser.add_argument(
        "--mux-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="A batch that takes longer fails and its connection is dropped. Default: 30",
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
