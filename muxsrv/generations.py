"""Which workers to start and to stop: the ``--workers`` supervisor's decisions, sans-IO.

The supervisor (``supervisor.py``) does the I/O: it spawns, signals and reaps
processes and reads their readiness pipes, tells a :class:`Generations` what
happened (``spawned``, ``ready``, ``exited``, ``reload``, ``stop``, ``tick``,
each with the time), and carries out the actions it is handed back
(``take()``: spawn a worker of generation G, SIGTERM or SIGKILL a PID).  So
every rule below is tested with a fake clock, no process involved.

Generations.  The workers started together are a generation, numbered from 1.
One generation *serves*: a worker of it that dies is replaced (after a
back-off if it died young, :class:`Backoff`).  A reload (SIGHUP) starts a new
generation of ``count`` fresh workers; once each has reported that it
serves, the new one serves and the old one *drains* (SIGTERM: it closes its
connections at message boundaries with ``server shutting down``); a draining
worker still running ``drain_timeout + stop_grace`` after its SIGTERM is
killed.  The listening sockets belong to the supervisor, so while both
generations run, new connections wait in the one accept queue for whichever
worker takes them first: none is refused or reset.

A new generation that fails (a worker exits before the generation serves,
or the generation is not ready within ``ready_timeout``) is logged and
stopped like a draining one; the generation that served keeps serving.  A
SIGHUP while a reload is in progress is queued (one at most, later ones fold
into it): when the reload in progress ends, serving or failed, another one
starts, so the code and files on disk at the last SIGHUP are the ones that
end up serving.

Starting.  Every worker must report that it serves within ``ready_timeout``
of its start, whether of generation 1, a reload or a replacement.  Until
generation 1 (or a reload started meanwhile) has served, a worker that exits,
cannot be spawned or misses that time means the workers cannot start at all
(a handler that raises at import, say): nothing is replaced, every worker is
stopped, and ``failed`` says why in one line (the supervisor exits 1 with
it).  Later, a replacement that misses its time is taken as hung: it is
stopped and replaced, with the back-off.  A worker's own words on why it
cannot start (``said``) go into the line about its exit.

Stopping (SIGINT/SIGTERM): every worker drains, a queued reload is dropped,
nothing more is started; ``done`` once all have exited.  A second stop, or a
worker past its time, is SIGKILLed.  ``status`` is 1 if any worker had to be
killed or ended badly while stopping.
"""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass
from typing import Final

__all__ = ["Backoff", "Generations", "describe_exit"]

log = logging.getLogger("muxsrv.workers")

#: A worker that died younger than HEALTHY_AFTER is restarted after FIRST_BACKOFF,
#: doubling with each such death up to MAX_BACKOFF ...
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 5.0
#: ... until a worker has lived this long.
HEALTHY_AFTER: Final = 10.0
#: How long a new generation may take to report that every worker serves: a fresh
#: interpreter importing the handler on a loaded machine takes a second or two;
#: one still not serving after this is taken as hung.
READY_TIMEOUT: Final = 30.0
CLEAN_EXITS: Final = frozenset({0, -signal.SIGTERM, -signal.SIGINT})

SPAWN: Final = "spawn"  # ("spawn", generation)
TERM: Final = "term"  # ("term", pid)
KILL: Final = "kill"  # ("kill", pid)


class Backoff:
    """How long to wait before replacing a worker that died (sans-IO: the caller's clock).

    A worker that lived ``HEALTHY_AFTER`` is replaced at once.  One that died
    younger starts a crash loop, or continues it: ``FIRST_BACKOFF`` doubling to
    ``MAX_BACKOFF``.  The loop is over once a worker has lived ``HEALTHY_AFTER``,
    or once that long has passed since the last young death's replacement.
    """

    def __init__(self) -> None:
        self.delay = 0.0  # the last back-off given; 0 outside a crash loop
        self._replaced = -math.inf  # when the last young death's replacement was due

    def died(self, now: float, lived: float) -> tuple[float, bool]:
        """(seconds to wait before the replacement, whether a crash loop starts)."""
        if lived >= HEALTHY_AFTER or now - self._replaced >= HEALTHY_AFTER:
            self.delay = 0.0
        if lived >= HEALTHY_AFTER:
            return 0.0, False
        starts = self.delay == 0.0
        self.delay = FIRST_BACKOFF if starts else min(self.delay * 2, MAX_BACKOFF)
        self._replaced = now + self.delay
        return self.delay, starts


@dataclass
class _Worker:
    generation: int
    started: float
    ready: bool = False
    kill_at: float = math.inf  # once SIGTERMed: when it gets a SIGKILL
    killed: bool = False


class Generations:
    """The supervisor's state: workers by PID, by generation (see the module docstring)."""

    def __init__(self, count: int, drain_timeout: float, stop_grace: float,
                 ready_timeout: float = READY_TIMEOUT) -> None:
        self.count = count
        self.stop_grace = stop_grace
        self.stop_after = drain_timeout + stop_grace  # SIGTERM to SIGKILL
        self.ready_timeout = ready_timeout
        self.serving = 1
        self.newest = 1
        self.starting = 0  # the generation a reload is starting; 0: none
        self.queued = False  # a SIGHUP came during the reload in progress
        self.ready_by = math.inf
        self.stopping = False
        self.status = 0
        self.workers: dict[int, _Worker] = {}
        self.due: list[float] = []  # replacements for the serving generation, when
        self.backoff = Backoff()
        self._actions: list[tuple[str, int]] = []
        self.up = False  # a generation has served: the workers can start
        self.failed = ""  # why they cannot: the supervisor's last word

    # -- what the supervisor reads --------------------------------------------

    def start(self) -> None:
        """The first generation."""
        self._actions += [(SPAWN, 1)] * self.count

    def take(self) -> list[tuple[str, int]]:
        """The actions decided since the last call, in order."""
        actions, self._actions = self._actions, []
        return actions

    @property
    def done(self) -> bool:
        return self.stopping and not self.workers

    def deadline(self) -> float:
        """The next moment ``tick`` has something to do (inf: none)."""
        kills = [w.kill_at for w in self.workers.values() if not w.killed]
        late = [w.started + self.ready_timeout for w in self.workers.values()
                if not w.ready and w.kill_at == math.inf]
        return min([math.inf, self.ready_by if self.starting else math.inf, *self.due, *kills,
                    *late])

    def waiting_for_ready(self) -> bool:
        """Is some worker still to report that it serves?  (Its pipe needs watching.)"""
        return any(not w.ready and w.kill_at == math.inf for w in self.workers.values())

    def pids(self, generation: int) -> list[int]:
        return sorted(pid for pid, w in self.workers.items() if w.generation == generation)

    # -- events -------------------------------------------------------------------

    def spawned(self, pid: int, generation: int, now: float) -> None:
        self.workers[pid] = _Worker(generation, now)
        if self.stopping or generation not in (self.serving, self.starting):
            self._term(pid, now)  # a stop (or a failed reload) came first

    def spawn_failed(self, generation: int, now: float, reason: str) -> None:
        """The process could not even be created: as a worker that died at once."""
        why = f"a worker could not be started ({reason})"
        if self.stopping:
            log.debug("%s while stopping", why)
        elif generation == self.starting:
            self._fail(now, why)
        elif generation == self.serving and not self.up:
            self._give_up(now, why)
        elif generation == self.serving:
            log.error("cannot start a worker of generation %d: %s", generation, reason)
            self._replace(now, self.backoff.died(now, 0.0)[0])

    def ready(self, pid: int, now: float) -> None:
        worker = self.workers.get(pid)
        if worker is None or worker.ready:
            return
        worker.ready = True
        if worker.generation == self.starting and len(self._ready(self.starting)) == self.count:
            self._serve(now)
        elif (worker.generation == self.serving and not self.up and not self.stopping
              and len(self._ready(self.serving)) == self.count):
            self.up = True
            log.info("generation %d serving (pids %s)", self.serving,
                     _listed(self._ready(self.serving)))

    def exited(self, pid: int, code: int, now: float, said: str = "") -> None:
        """Worker ``pid`` ended (``waitstatus_to_exitcode``); ``said``: why, in its words."""
        worker = self.workers.pop(pid, None)
        if worker is None:
            return
        generation = worker.generation
        lived = now - worker.started
        expected = code in CLEAN_EXITS or (worker.killed and code == -signal.SIGKILL)
        how = describe_exit(code) + (f" ({said})" if said else "")
        if self.stopping:
            if not expected:
                (log.debug if self.failed else log.warning)(
                    "worker %d %s while stopping", pid, how)
                self.status = 1
        elif generation == self.starting:
            self._fail(now, f"worker {pid} {how} before the generation served")
        elif generation == self.serving and worker.kill_at == math.inf and not self.up:
            self._give_up(now, f"worker {pid} {how}")
        elif generation == self.serving and worker.kill_at == math.inf:
            self._died(pid, how, lived, now)
        else:  # draining: an old generation, a failed new one, or a hung worker
            if not expected:  # (a failed generation's failure has been told)
                (log.debug if generation > self.serving else log.warning)(
                    "reload: worker %d of generation %d %s while draining", pid, generation, how)
            if not self.pids(generation) and generation != self.serving:
                log.info("reload: generation %d drained", generation)

    def reload(self, now: float) -> None:
        """SIGHUP."""
        if self.stopping:
            log.info("SIGHUP while stopping: ignored")
        elif self.starting:
            if not self.queued:
                log.info("reload: SIGHUP while generation %d starts; another reload will "
                         "follow it", self.starting)
            self.queued = True
        else:
            self._begin(now)

    def stop(self, now: float, signame: str) -> None:
        """SIGINT or SIGTERM; a second one kills every worker."""
        if self.stopping:
            log.warning("second signal: killing the %d workers still running", len(self.workers))
            self._kill_all()
            return
        log.info("%s: stopping %d workers", signame, len(self.workers))
        self.stopping = True
        self.queued = False
        self.starting = 0
        self.due.clear()
        for pid, worker in self.workers.items():
            if worker.kill_at == math.inf:
                self._term(pid, now)

    def tick(self, now: float) -> None:
        """Time passed: replacements due, new workers late, draining workers late."""
        if self.starting and now >= self.ready_by:
            self._fail(now, f"not every worker serves after {self.ready_timeout:g} s")
        hung = [pid for pid, w in self.workers.items()
                if not w.ready and w.kill_at == math.inf and w.generation != self.starting
                and now >= w.started + self.ready_timeout]
        if hung and not self.up:
            self._give_up(now, f"worker {hung[0]} is not serving {self.ready_timeout:g} s "
                               "after it started")
        for pid in hung if self.up else []:
            log.warning("worker %d of generation %d is not serving %g s after it started; "
                        "stopping it and starting another", pid, self.workers[pid].generation,
                        self.ready_timeout)
            self._term(pid, now)
            self._replace(now, self.backoff.died(now, 0.0)[0])
        while not self.stopping and self.due and min(self.due) <= now:
            self.due.remove(min(self.due))
            self._actions.append((SPAWN, self.serving))
        late = [pid for pid, w in self.workers.items() if now >= w.kill_at and not w.killed]
        if late and self.stopping:
            log.warning("%d workers still running %g s after the drain timeout; killing them",
                        len(late), self.stop_grace)
        for pid in late:
            if not self.stopping:
                log.warning("reload: worker %d of generation %d still running %g s after "
                            "SIGTERM; killing it", pid, self.workers[pid].generation,
                            self.stop_after)
            self._kill(pid)

    # -- the rules ---------------------------------------------------------------------

    def _begin(self, now: float) -> None:
        self.newest += 1
        self.starting = self.newest
        self.ready_by = now + self.ready_timeout
        log.info("reload: starting generation %d (%d workers)", self.starting, self.count)
        self._actions += [(SPAWN, self.starting)] * self.count

    def _serve(self, now: float) -> None:
        new, old = self.starting, self.serving
        log.info("reload: generation %d serving (pids %s); draining generation %d (pids %s)",
                 new, _listed(self.pids(new)), old, _listed(self.pids(old)) or "none")
        self.serving, self.starting = new, 0
        self.ready_by = math.inf
        self.up = True
        self.due.clear()  # replacements for the old generation are not needed any more
        for pid, worker in self.workers.items():
            if worker.generation == old and worker.kill_at == math.inf:
                self._term(pid, now)
        if not self.pids(old):
            log.info("reload: generation %d drained", old)
        self._next(now)

    def _fail(self, now: float, why: str) -> None:
        failed = self.starting
        log.error("reload: generation %d failed: %s; stopping it, generation %d keeps serving",
                  failed, why, self.serving)
        self.starting = 0
        self.ready_by = math.inf
        for pid, worker in self.workers.items():
            if worker.generation == failed and worker.kill_at == math.inf:
                self._term(pid, now)
        self._next(now)

    def _give_up(self, now: float, why: str) -> None:
        """The workers cannot start: stop them all, quietly (``failed`` is the one line)."""
        self.failed = f"the workers cannot start: {why}"
        self.stopping = True
        self.status = 1
        self.queued = False
        self.starting = 0
        self.due.clear()
        for pid, worker in self.workers.items():
            if worker.kill_at == math.inf:
                self._term(pid, now)

    def _next(self, now: float) -> None:
        if self.queued:
            self.queued = False
            self._begin(now)

    def _died(self, pid: int, how: str, lived: float, now: float) -> None:
        delay, starts = self.backoff.died(now, lived)
        if delay == 0:
            log.warning("worker %d %s after %.0f s; starting another", pid, how, lived)
        elif starts:
            log.warning(
                "worker %d %s %.1f s after starting; restarting workers after a back-off "
                "(%g s doubling to %g s) until one has lived %g s",
                pid, how, lived, FIRST_BACKOFF, MAX_BACKOFF, HEALTHY_AFTER,
            )
        else:
            log.debug("worker %d %s; restarting in %g s", pid, how, delay)
        self._replace(now, delay)

    def _replace(self, now: float, delay: float) -> None:
        if delay == 0:
            self._actions.append((SPAWN, self.serving))
        else:
            self.due.append(now + delay)

    def _ready(self, generation: int) -> list[int]:
        return sorted(pid for pid, w in self.workers.items()
                      if w.generation == generation and w.ready)

    def _term(self, pid: int, now: float) -> None:
        self.workers[pid].kill_at = now + self.stop_after
        self._actions.append((TERM, pid))

    def _kill(self, pid: int) -> None:
        self.workers[pid].killed = True
        self.status = 1 if self.stopping else self.status
        self._actions.append((KILL, pid))

    def _kill_all(self) -> None:
        for pid, worker in self.workers.items():
            if not worker.killed:
                self._kill(pid)
        self.status = 1 if self.workers else self.status


def describe_exit(code: int) -> str:
    """How a worker ended, from ``waitstatus_to_exitcode``."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _listed(pids: list[int]) -> str:
    return ", ".join(map(str, pids))
