"""A stand-in for the server's admin listener: GET /stats serves JSON shaped as the contract
says, its counters advancing by fixed steps on every request (the real admin listener is
another branch's; the end-to-end test comes with both)."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STATS: dict[str, Any] = {
    "version": "0.0.0",
    "uptime_seconds": 12.5,
    "options": {"handler": "echo", "framing": "length"},
    "connections": {"accepted": 10, "current": 3, "peak": 5, "refused": {"max_conns": 0},
                    "closed": {"eof": 5}},
    "messages": {"in": 1000, "out": 998},
    "bytes": {"in": 40000, "out": 39920},
    "handler_errors": 0,
    "flow_control_pauses": 0,
    "pending_output_bytes": 0,
    "buffered_input_bytes": 0,
    "emfile_episodes": 0,
    "exec": {"started": 0, "running": 0, "queued": 0, "finished": {"exit_0": 0}},
    "latency": {
        "echo": {"count": 998, "p50_us": 12.0, "p90_us": 20.0, "p99_us": 45.0,
                 "p999_us": 90.0, "max_us": 120.0},
        "upper": {"count": 10, "p50_us": 900.0, "p90_us": 1500.0, "p99_us": 2500.0,
                  "p999_us": 2600.0, "max_us": 2700.0},
    },
    "admin": {"accepted": 2, "current": 1},
}


class FakeAdmin:
    """``stats``: what the next /stats is based on; every request adds ``step`` to the
    counters named in it ({"messages.in": 100, ...}).  ``status``: the HTTP status to give."""

    def __init__(self, stats: dict[str, Any] | None = None,
                 step: dict[str, int] | None = None) -> None:
        self.stats = copy.deepcopy(STATS if stats is None else stats)
        self.step = step or {}
        self.status = 200
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with fake.lock:
                    fake.requests.append((self.path, self.headers.get("Authorization")))
                    body = json.dumps(fake.stats).encode()
                    fake.advance()
                    status = fake.status
                if self.path != "/stats":
                    status, body = 404, b"not found\n"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"

    def advance(self) -> None:
        for dotted, amount in self.step.items():
            *path, last = dotted.split(".")
            node = self.stats
            for key in path:
                node = node[key]
            node[last] += amount


@contextmanager
def fake_admin(stats: dict[str, Any] | None = None,
               step: dict[str, int] | None = None) -> Iterator[FakeAdmin]:
    fake = FakeAdmin(stats, step)
    thread = threading.Thread(target=fake.server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join(5)
