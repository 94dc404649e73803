"""The supervisor's decisions (muxsrv.generations), with a fake clock and made-up PIDs.

Catches: an old generation stopped before the new one serves (connections
wait on no one), or never stopped; a failed reload taking the serving
generation down, or leaving its own workers behind; a SIGHUP during a reload
lost or starting a third generation at once; stragglers never killed; a
replacement started for a generation that no longer serves.
"""

from __future__ import annotations

import logging
import math
import signal

import pytest

from muxsrv.generations import KILL, SPAWN, TERM, Generations

DRAIN, GRACE, READY = 5.0, 4.0, 30.0


class Harness:
    """A Generations and the processes it asked for, PIDs counting from 100."""

    def __init__(self, count: int = 2) -> None:
        self.gens = Generations(count, DRAIN, GRACE, READY)
        self.now = 0.0
        self.next_pid = 100
        self.termed: list[int] = []
        self.killed: list[int] = []
        self.gens.start()
        self.spawned = self.act()

    def act(self) -> list[int]:
        """Carry out the actions; the PIDs of the workers spawned."""
        spawned = []
        while actions := self.gens.take():
            for action, arg in actions:
                if action == SPAWN:
                    pid = self.next_pid
                    self.next_pid += 1
                    spawned.append(pid)
                    self.gens.spawned(pid, arg, self.now)
                elif action == TERM:
                    self.termed.append(arg)
                else:
                    assert action == KILL
                    self.killed.append(arg)
        return spawned

    def ready(self, *pids: int) -> list[int]:
        for pid in pids:
            self.gens.ready(pid, self.now)
        return self.act()

    def exit(self, pid: int, code: int = 0) -> list[int]:
        self.gens.exited(pid, code, self.now)
        return self.act()

    def at(self, now: float) -> list[int]:
        self.now = now
        self.gens.tick(now)
        return self.act()

    def reload(self) -> list[int]:
        self.gens.reload(self.now)
        return self.act()


def test_a_reload_drains_the_old_generation_only_once_the_new_one_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "muxsrv")
    h = Harness()
    assert h.spawned == [100, 101]
    h.ready(100, 101)
    assert "generation 1 serving (pids 100, 101)" in caplog.text
    h.now = 1.0
    new = h.reload()
    assert new == [102, 103] and h.gens.starting == 2
    h.ready(102)
    assert h.termed == []  # one new worker serves: the old ones stay
    h.ready(103)
    assert h.termed == [100, 101] and h.gens.serving == 2 and h.gens.starting == 0
    assert "reload: generation 2 serving (pids 102, 103); draining generation 1 " \
           "(pids 100, 101)" in caplog.text
    h.exit(100)
    assert "generation 1 drained" not in caplog.text
    assert h.exit(101) == []  # a drained worker is not replaced
    assert "reload: generation 1 drained" in caplog.text
    assert h.gens.pids(2) == [102, 103] and h.gens.status == 0


def test_a_straggler_of_the_old_generation_is_killed_after_the_drain_timeout_and_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "muxsrv")
    h = Harness()
    h.ready(100, 101)
    h.reload()
    h.now = 2.0
    h.ready(102, 103)
    h.exit(100)
    h.at(2.0 + DRAIN + GRACE - 0.01)
    assert h.killed == []
    assert h.gens.deadline() == pytest.approx(2.0 + DRAIN + GRACE)
    h.at(2.0 + DRAIN + GRACE)
    assert h.killed == [101]
    assert "worker 101 of generation 1 still running 9 s after SIGTERM; killing it" in caplog.text
    h.exit(101, -signal.SIGKILL)
    assert "generation 1 drained" in caplog.text
    assert h.gens.status == 0  # a reload's straggler is no failure of the supervisor


@pytest.mark.parametrize("how", ["exits", "times out"])
def test_a_new_generation_that_fails_is_stopped_and_the_old_one_keeps_serving(
    how: str, caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    h.ready(100, 101)
    h.now = 1.0
    h.reload()
    h.ready(102)
    if how == "exits":
        h.exit(103, 2)
        assert "reload: generation 2 failed: worker 103 exited with status 2 before the " \
               "generation served; stopping it, generation 1 keeps serving" in caplog.text
    else:
        assert h.gens.deadline() == 1.0 + READY
        h.at(1.0 + READY)
        assert "reload: generation 2 failed: not every worker serves after 30 s" in caplog.text
    assert h.termed == [102] + ([103] if how == "times out" else [])
    assert h.gens.serving == 1 and h.gens.starting == 0
    assert h.exit(102) == []  # the failed generation's workers are not replaced ...
    h.now = 20.0  # long-lived: replaced at once
    assert h.exit(101, -signal.SIGKILL) == [104]  # ... the serving generation's are
    assert h.gens.workers[104].generation == 1
    # The next SIGHUP tries again, as generation 3.
    h.reload()
    assert h.gens.starting == 3


def test_a_sighup_during_a_reload_is_queued_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "muxsrv")
    h = Harness()
    h.ready(100, 101)
    assert h.reload() == [102, 103]
    assert h.reload() == [] and h.reload() == []  # queued, folded into one
    assert caplog.text.count("another reload will follow it") == 1
    third = h.ready(102, 103)
    assert third == [104, 105] and h.gens.starting == 3  # generation 2 served: then 3 starts
    assert h.termed == [100, 101]
    h.ready(104, 105)
    assert h.termed == [100, 101, 102, 103] and h.gens.serving == 3
    assert h.reload() == [106, 107]  # nothing queued any more: a SIGHUP starts one
    assert h.gens.starting == 4


def test_a_queued_reload_follows_a_failed_one() -> None:
    h = Harness()
    h.ready(100, 101)
    h.reload()
    h.reload()  # queued: perhaps the fix for what is about to fail
    assert h.exit(102, 1) == [104, 105]
    assert h.gens.starting == 3 and h.gens.serving == 1


def test_serving_workers_are_replaced_with_the_backoff_and_no_longer_once_drained() -> None:
    h = Harness()
    h.ready(100, 101)
    h.now = 0.5
    assert h.exit(100, 1) == []  # died young: after the back-off
    assert h.gens.deadline() == pytest.approx(0.6)
    assert h.at(0.6) == [102]
    h.exit(102, 1)  # young again: 0.2 s
    h.reload()  # generation 2 serves before the replacement is due
    h.ready(103, 104)
    assert h.at(5.0) == []  # the due replacement was for generation 1


def test_stop_drains_everything_a_second_stop_kills(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "muxsrv")
    h = Harness()
    h.ready(100, 101)
    h.reload()  # generation 2 starting when the stop comes
    h.reload()  # queued
    h.gens.stop(h.now, "SIGTERM")
    h.act()
    assert sorted(h.termed) == [100, 101, 102, 103]
    assert h.gens.queued is False and h.gens.starting == 0
    assert "SIGTERM: stopping 4 workers" in caplog.text
    h.ready(102, 103)  # late news: nothing follows
    assert h.gens.take() == []
    h.reload()
    assert h.gens.take() == [] and "SIGHUP while stopping: ignored" in caplog.text
    h.exit(100)
    h.exit(101, -signal.SIGTERM)
    assert not h.gens.done and h.gens.status == 0
    h.gens.stop(h.now, "SIGTERM")
    h.act()
    assert h.killed == [102, 103] and h.gens.status == 1
    h.exit(102, -signal.SIGKILL)
    h.exit(103, -signal.SIGKILL)
    assert h.gens.done and "worker 10" not in caplog.text


def test_stopping_workers_late_past_the_drain_are_killed_and_fail_the_exit() -> None:
    h = Harness()
    h.gens.stop(0.0, "SIGINT")
    h.act()
    assert h.gens.deadline() == DRAIN + GRACE
    h.at(DRAIN + GRACE)
    assert h.killed == [100, 101] and h.gens.status == 1
    assert h.gens.deadline() == math.inf  # killed once, not again at every tick
    h.at(DRAIN + GRACE + 1)
    assert h.killed == [100, 101]


def test_a_worker_failing_while_stopping_fails_the_exit(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    h.gens.stop(0.0, "SIGTERM")
    h.exit(100, 3)
    assert "worker 100 exited with status 3 while stopping" in caplog.text
    assert h.gens.status == 1


def test_a_spawn_that_fails_during_a_reload_fails_the_reload() -> None:
    h = Harness()
    h.ready(100, 101)
    h.reload()
    h.gens.spawn_failed(2, h.now, "Resource temporarily unavailable")
    h.act()
    assert h.gens.starting == 0 and h.termed == [102, 103]
    assert h.gens.deadline() == DRAIN + GRACE  # for the failed generation's workers


def test_a_sigkill_from_elsewhere_while_stopping_is_news(caplog: pytest.LogCaptureFixture) -> None:
    """Bug caught: every SIGKILL taken for our own (the OOM killer's is not)."""
    h = Harness()
    h.gens.stop(0.0, "SIGTERM")
    h.act()
    h.exit(100, -signal.SIGKILL)
    assert "worker 100 was killed by SIGKILL while stopping" in caplog.text
    assert h.gens.status == 1


# -- starting: generation 1, replacements, and workers that never serve ------------------


@pytest.mark.parametrize("how", ["exits", "cannot be spawned", "never serves"])
def test_a_first_generation_that_cannot_start_stops_everything_with_one_reason(
    how: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Bug caught: generation 1 failing at start restarted forever with a back-off (or, for a
    spawn that fails, at once in a busy loop), never reported; a hung one polled forever."""
    caplog.set_level(logging.DEBUG, "muxsrv")
    h = Harness()
    h.ready(100)  # one serves: the generation does not
    if how == "exits":
        h.now = 0.5
        h.gens.exited(101, 2, h.now, "handler 'x' failed: RuntimeError: boom")
        assert h.act() == []  # not replaced
        why = "worker 101 exited with status 2 (handler 'x' failed: RuntimeError: boom)"
    elif how == "cannot be spawned":
        h.gens.workers.pop(101)  # as if its spawn had been the one to fail
        h.gens.spawn_failed(1, h.now, "Resource temporarily unavailable")
        assert h.act() == []
        why = "a worker could not be started (Resource temporarily unavailable)"
    else:
        assert h.gens.waiting_for_ready()
        assert h.gens.deadline() == READY
        assert h.at(READY - 0.01) == [] and not h.gens.failed
        assert h.at(READY) == []
        why = "worker 101 is not serving 30 s after it started"
        assert not h.gens.waiting_for_ready()  # no more polling of its pipe
    assert h.gens.failed == f"the workers cannot start: {why}"
    assert h.gens.stopping and h.gens.status == 1
    assert 100 in h.termed and h.gens.deadline() == pytest.approx(h.now + DRAIN + GRACE)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []  # failed: the line
    h.exit(100)
    if how == "never serves":
        h.exit(101, -signal.SIGTERM)
    assert h.gens.done and h.gens.take() == []
    assert "generation 1 serving" not in caplog.text


def test_the_first_worker_exit_is_the_reason_and_its_siblings_are_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    h.gens.exited(100, 2, 0.1, "bad option")
    h.act()
    assert h.gens.failed == "the workers cannot start: worker 100 exited with status 2 " \
                            "(bad option)"
    assert h.termed == [101]
    h.gens.exited(101, 2, 0.1, "bad option")  # it failed too, before the SIGTERM landed
    assert h.gens.failed.startswith("the workers cannot start: worker 100 ")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert h.gens.done and h.gens.status == 1


def test_a_sigterm_while_the_first_generation_starts_is_a_stop_not_a_failure() -> None:
    h = Harness()
    h.gens.stop(0.0, "SIGTERM")
    h.act()
    h.exit(100, -signal.SIGTERM)
    h.exit(101, -signal.SIGTERM)
    assert h.gens.done and h.gens.status == 0 and h.gens.failed == ""


def test_a_replacement_that_never_serves_is_stopped_and_replaced_with_the_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bug caught: a replacement that hangs before serving kept (and its pipe polled) forever."""
    h = Harness()
    h.ready(100, 101)
    h.now = 20.0
    assert h.exit(100, -signal.SIGKILL) == [102]  # lived long: replaced at once
    assert h.gens.waiting_for_ready() and h.gens.deadline() == 20.0 + READY
    assert h.at(20.0 + READY - 0.01) == [] and h.termed == []
    assert h.at(20.0 + READY) == []  # stopped; its replacement after the back-off
    assert h.termed == [102] and not h.gens.waiting_for_ready()
    assert "worker 102 of generation 1 is not serving 30 s after it started; stopping it " \
           "and starting another" in caplog.text
    assert h.at(20.0 + READY + 0.1) == [103]
    h.exit(102, -signal.SIGTERM)  # the hung one goes: no further replacement
    assert h.gens.take() == [] and h.gens.pids(1) == [101, 103]
    h.ready(103)
    assert not h.gens.waiting_for_ready() and h.gens.failed == "" and not h.gens.stopping


def test_a_replacement_that_cannot_be_spawned_is_retried_after_the_backoff_not_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bug caught: a failing fork (EAGAIN) retried at once, again and again: a busy loop."""
    h = Harness()
    h.ready(100, 101)
    h.now = 20.0
    h.gens.exited(100, -signal.SIGKILL, h.now)
    assert h.gens.take() == [(SPAWN, 1)]
    h.gens.spawn_failed(1, h.now, "Resource temporarily unavailable")
    assert h.gens.take() == []  # not at once
    assert "cannot start a worker of generation 1: Resource temporarily unavailable" \
           in caplog.text
    assert h.at(20.1) == [102]
    assert h.gens.failed == "" and not h.gens.stopping


def test_a_replacements_own_reason_is_in_the_line_about_its_exit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    h.ready(100, 101)
    h.now = 20.0
    h.gens.exited(100, 2, h.now, "handler 'x': importing module 'x' failed: SyntaxError")
    assert "worker 100 exited with status 2 (handler 'x': importing module 'x' failed: " \
           "SyntaxError) after 20 s; starting another" in caplog.text
    assert h.gens.failed == ""


def test_a_failed_reloads_other_workers_failing_the_same_way_are_not_news(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness()
    h.ready(100, 101)
    h.reload()
    h.gens.exited(102, 2, h.now, "broken")
    h.act()
    assert caplog.text.count("broken") == 1
    h.gens.exited(103, 2, h.now, "broken")  # before its SIGTERM landed
    assert caplog.text.count("broken") == 1
    assert h.gens.serving == 1 and h.gens.failed == ""
