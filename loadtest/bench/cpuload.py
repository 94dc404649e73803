"""How busy the machine is apart from us: a gate before each run, a figure during it.

The idea: this machine is shared, and a run measured while someone else's
tests hold a CPU says little.  Before each load run the bench waits (briefly,
boundedly) for the machine to be quiet, and during the measured window it
computes the CPU time used by everything except the server and the generator,
so the report can say which figures were taken under background load.
Busy time is user + nice + system + steal from /proc/stat (interrupt time is
left out: our own loopback traffic lands there).
"""

from __future__ import annotations

import os
import time

HZ = os.sysconf("SC_CLK_TCK")
QUIET = 0.10  # background below a tenth of one CPU counts as quiet
SAMPLE = 0.2  # seconds per look
NOISY = 0.25  # background above a quarter of a CPU during a run: flagged, and tried again


def busy_seconds() -> float:
    """CPU seconds spent busy so far, summed over all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, steal = fields[0], fields[1], fields[2], fields[7]
    return (user + nice + system + steal) / HZ


def wait_quiet(max_wait: float) -> float:
    """Wait until the machine is quiet, at most `max_wait` s; return the last background share."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = busy_seconds(), time.monotonic()
        time.sleep(SAMPLE)
        share = (busy_seconds() - b0) / (time.monotonic() - t0)
        if share < QUIET or time.monotonic() > deadline:
            return share
