"""``kill -HUP`` with --workers: a new generation of fresh workers, then the old one drains.

Catches: connections refused or reset during the hand-over (a listener closed
and opened again, or a worker's own SO_REUSEPORT queue dropped); a reply lost,
doubled or wrong while the old workers drain; old workers kept (or killed
before they drain), or PIDs reused (a forked copy instead of a new worker);
a reload whose workers fail taking the serving ones down; workers that run
the code imported at start instead of the code on disk now.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, wait_for
from test_workers import alive, children, supervisor, worker_pids

from muxsrv.client import Client
from muxsrv.supervisor import STOP_GRACE

pytestmark = pytest.mark.timeout(120)

DRAIN = 2.0
TAGGING_HANDLER = """
import os

PID = str(os.getpid()).encode()

def tag(payload: bytes) -> bytes:
    return payload + b"|" + PID
"""
SERVING_RE = r"reload: generation {} serving \(pids ([\d, ]+)\)"


def env_for(tmp_path: Path) -> dict[str, str]:
    # No .pyc: a rewrite within the same second and of the same size must not look unchanged.
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass
class Load:
    """Client threads connecting, pipelining and reconnecting until told to stop."""

    address: tuple[str, int]
    threads: int = 4
    max_seconds: float = 60.0
    max_requests: int = 200_000  # per thread
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    answered: int = 0
    refused: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    resent_after_goodbye: int = 0
    served: list[tuple[float, int]] = field(default_factory=list)  # (when, worker pid)

    def start(self) -> list[threading.Thread]:
        workers = [threading.Thread(target=self.run, args=(n,), daemon=True)
                   for n in range(self.threads)]
        for thread in workers:
            thread.start()
        return workers

    def run(self, n: int) -> None:
        """Thread n % 4: 0, connections of 1-7 pipelines; 1, of 50; 2, one connection busy
        throughout (the drain timeout closes it); 3, one connection with pauses (closed once
        quiet)."""
        per_connection = (7, 50, self.max_requests, self.max_requests)[n % 4]
        deadline = time.monotonic() + self.max_seconds
        seq = 0
        cycle = 0
        try:
            while not self.stop.is_set() and time.monotonic() < deadline \
                    and seq < self.max_requests:
                try:
                    client = Client(*self.address, timeout=15, reconnect_timeout=15)
                except OSError as exc:
                    with self.lock:
                        self.refused.append(f"thread {n}: {exc!r}")
                    return
                with client:
                    long_lived = n % 4 >= 2
                    for _ in range(per_connection if long_lived else 1 + cycle % per_connection):
                        cycle += 1
                        depth = 1 + cycle % 8
                        payloads = [b"t%d-r%d-%s" % (n, seq + i, b"x" * (cycle % 50))
                                    for i in range(depth)]
                        seq += depth
                        with self.lock:
                            self.sent += depth
                        replies = (client.pipeline(payloads) if depth > 1
                                   else [client.request(payloads[0])])
                        now = time.monotonic()
                        self.check(payloads, replies, now)
                        if self.stop.is_set() or time.monotonic() > deadline:
                            break
                        if n % 4 == 3 and cycle % 20 == 0:
                            self.stop.wait(0.3)  # quiet for longer than the drain waits for
                    with self.lock:
                        self.resent_after_goodbye += client.reconnects
        except Exception as exc:
            with self.lock:
                self.failures.append(f"thread {n}: {exc!r}")

    def check(self, payloads: list[bytes], replies: list[bytes], now: float) -> None:
        with self.lock:
            self.answered += len(replies)
            for payload, reply in zip(payloads, replies, strict=True):
                sent, bar, pid = reply.rpartition(b"|")
                if sent != payload or not bar or not pid.isdigit():
                    self.wrong.append(f"{payload!r} -> {reply!r}")
                else:
                    self.served.append((now, int(pid)))

    def pids_since(self, moment: float) -> set[int]:
        with self.lock:
            return {pid for when, pid in self.served if when > moment}

    def requests(self) -> int:
        with self.lock:
            return self.answered


def serving_pids(srv: ServerProcess, generation: int) -> set[int]:
    line = srv.wait_log(SERVING_RE.format(generation), timeout=40)
    found = re.search(SERVING_RE.format(generation), line)
    assert found is not None
    return {int(pid) for pid in found.group(1).split(", ")}


def test_two_reloads_under_load_drop_nothing(tmp_path: Path) -> None:
    (tmp_path / "tagger.py").write_text(TAGGING_HANDLER)
    with supervisor("--workers", "2", "--handler", "tagger:tag", "--drain-timeout", str(DRAIN),
                    env=env_for(tmp_path)) as srv:
        srv.wait_started()
        wait_for(lambda: len(worker_pids(srv)) == 2, what="two workers listening")
        first = set(worker_pids(srv))
        srv.wait_log(r"generation 1 serving")
        load = Load(srv.address)
        threads = load.start()
        try:
            generations = [first]
            for generation in (2, 3):
                before = load.requests()
                wait_for(lambda before=before: load.requests() > before + 200, timeout=30,
                         what="load flowing")
                srv.signal(signal.SIGHUP)
                new = serving_pids(srv, generation)
                served_at = time.monotonic()
                old = generations[-1]
                for earlier in generations:
                    assert not new & earlier, "every worker of a new generation is a new process"
                wait_for(lambda old=old: not any(alive(pid) for pid in old),
                         timeout=DRAIN + STOP_GRACE + 5, what=f"generation {generation - 1} gone")
                gone_after = time.monotonic() - served_at
                assert gone_after < DRAIN + 3, f"old workers took {gone_after:.1f} s"
                srv.wait_log(rf"reload: generation {generation - 1} drained")
                assert set(children(srv.pid)) == new
                # From now on, only the new generation answers.
                moment = time.monotonic()
                wait_for(lambda moment=moment: load.pids_since(moment), timeout=20,
                         what="replies after the drain")
                assert load.pids_since(moment) <= new
                generations.append(new)
        finally:
            load.stop.set()
            for thread in threads:
                thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
        assert load.refused == [], load.refused
        assert load.failures == [], load.failures
        assert load.wrong == [], load.wrong[:5]
        assert load.answered == load.sent and load.sent > 1000
        print(f"{load.sent} requests, {load.resent_after_goodbye} hand-overs")
        # The busy connection and the pausing one were handed over at each reload.
        assert load.resent_after_goodbye >= 4, load.resent_after_goodbye
        text = srv.stderr_text()
        assert "killing it" not in text and "Traceback" not in text, text
        assert srv.stop() == 0
        srv.all_gone()


VERSIONED_HANDLER = """
VERSION = b"{version}"

def tag(payload: bytes) -> bytes:
    return VERSION + b" " + payload
"""


def ask(srv: ServerProcess, times: int = 6) -> set[bytes]:
    """The replies of a few fresh connections (spread over the workers)."""
    replies = set()
    for _ in range(times):
        with Client(*srv.address) as client:
            replies.add(client.request(b"x"))
    return replies


def test_a_failed_reload_keeps_the_old_generation_and_a_fixed_one_runs_the_new_code(
    tmp_path: Path,
) -> None:
    handler = tmp_path / "versioned.py"
    handler.write_text(VERSIONED_HANDLER.format(version="one"))
    with supervisor("--workers", "2", "--handler", "versioned:tag", "--drain-timeout", "1",
                    env=env_for(tmp_path)) as srv:
        srv.wait_started()
        srv.wait_log(r"generation 1 serving")
        first = set(worker_pids(srv))
        assert ask(srv) == {b"one x"}

        handler.write_text("raise RuntimeError('broken on purpose')\n")
        srv.signal(signal.SIGHUP)
        srv.wait_log(r"reload: generation 2 failed: worker \d+ exited with status 2 \(handler "
                     r"'versioned:tag' .*: importing module 'versioned' failed: RuntimeError: "
                     r"broken on purpose\) before the generation served; stopping it, "
                     r"generation 1 keeps serving", timeout=40)
        # The worker's reason is in the supervisor's line (above), not in lines of its own.
        assert srv.log_count(r"broken on purpose") == 1, srv.stderr_text()
        wait_for(lambda: set(children(srv.pid)) == first, timeout=15,
                 what="only generation 1 left")
        assert ask(srv) == {b"one x"}

        handler.write_text(VERSIONED_HANDLER.format(version="two!"))
        srv.signal(signal.SIGHUP)
        new = serving_pids(srv, 3)
        assert not new & first
        wait_for(lambda: not any(alive(pid) for pid in first), timeout=1 + STOP_GRACE + 5,
                 what="generation 1 gone")
        assert ask(srv) == {b"two! x"}
        assert srv.stop() == 0
        srv.all_gone()


def test_a_sighup_during_a_reload_is_followed_by_one_more() -> None:
    with supervisor("--workers", "2", "--drain-timeout", "1") as srv:
        srv.wait_started()
        srv.wait_log(r"generation 1 serving")
        srv.signal(signal.SIGHUP)
        srv.wait_log(r"reload: starting generation 2")
        srv.signal(signal.SIGHUP)  # while generation 2 starts (or, on a slow day, just after)
        third = serving_pids(srv, 3)
        wait_for(lambda: srv.log_count(r"reload: generation [12] drained") == 2, timeout=20,
                 what="generations 1 and 2 drained")
        assert set(children(srv.pid)) == third
        assert srv.log_count(r"reload: starting generation") == 2  # no fourth
        assert srv.log_count(r"another reload will follow it") <= 1
        with Client(*srv.address) as client:
            assert client.request(b"still") == b"still"
        assert srv.stop() == 0
        srv.all_gone()


def test_sighup_in_a_single_process_says_what_it_reloaded(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-long-enough-0123\nanother-token-long-enough\n")
    srv = ServerProcess(["--port", "0", "--auth-token-file", str(tokens)])
    try:
        srv.wait_started()
        srv.signal(signal.SIGHUP)
        line = srv.wait_log(r"SIGHUP: ")
        assert line.endswith(
            "SIGHUP: re-read --auth-token-file: 2 tokens; the log goes to stderr (no log file "
            "to reopen); the handler code is not reloaded (it is with --workers)"), line
        assert "a-token" not in srv.stderr_text()
        with Client(*srv.address, token="another-token-long-enough") as client:
            assert client.request(b"up") == b"up"
        assert srv.stop() == 0
    finally:
        srv.kill()


def test_sighup_without_anything_to_reload_does_not_kill_a_single_process() -> None:
    srv = ServerProcess(["--port", "0"])
    try:
        srv.wait_started()
        srv.signal(signal.SIGHUP)
        line = srv.wait_log(r"SIGHUP: ")
        assert "SIGHUP: the log goes to stderr" in line
        with Client(*srv.address) as client:
            assert client.request(b"up") == b"up"
        assert srv.stop() == 0
    finally:
        srv.kill()
