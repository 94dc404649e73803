"""How a plugin author load-tests their own handler: a MuxUser subclass and a task.

    python -m muxsrv --handler loadtest.examples.reverse_handler:reverse &
    locust -f loadtest/examples/reverse_locustfile.py --headless -u 100 -r 50 -t 30s \
        --host tcp://127.0.0.1:9999

Every reply goes through `check`; a reply that is not the payload reversed is a
Locust failure.  All of --csv, --html, --processes and the web UI work as for
loadtest/locustfile.py.  Outside this repository, install the kit
(`pip install 'muxsrv[loadtest]'`) and leave out the sys.path line.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

# muxsrv from this checkout, installed or not, from any directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from locust import task

from muxsrv.locust import MuxUser, WrongReply, raise_open_file_limit

raise_open_file_limit()  # one socket per user: allow as many as the hard limit


def reversed_payload(sent: bytes, reply: bytes) -> None:
    if reply != sent[::-1]:
        raise WrongReply("reply is not the payload reversed")


class ReverseUser(MuxUser):
    handler = "reverse"  # the request type in Locust's tables
    host = "tcp://127.0.0.1:9999"

    @task(3)
    def word(self) -> None:
        self.client.request(b"stressed", name="word", check=reversed_payload)

    @task(1)
    def random_bytes(self) -> None:
        payload = random.randbytes(random.randrange(1, 4096))
        # A check may also just return a bool: False fails the request.
        self.client.request(payload, name="random 1-4095 B", check=lambda s, r: r == s[::-1])

    @task(1)
    def pipelined(self) -> None:
        # Ten requests in flight at once; each reply is checked and timed on its own.
        self.client.pipeline(
            [b"%d" % n for n in range(100, 110)], name="10 in flight", check=reversed_payload
        )
