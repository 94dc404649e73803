"""Process tuning at start-up: allocator thresholds and the open-files limit.

Catches a tuning call that stops taking effect (bulk throughput halves
silently) or that overrides an operator's own MALLOC_*_ settings.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

from support import ROOT

CHECK = """
import resource
from muxsrv.tuning import keep_large_buffers_mapped, raise_open_files_limit
print(keep_large_buffers_mapped())
soft, hard = raise_open_files_limit()
print(soft == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def run_check(env: dict[str, str]) -> list[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if name not in env:
            full.pop(name, None)
    out = subprocess.run([sys.executable, "-c", CHECK], env=full, capture_output=True,
                         text=True, timeout=30, check=True)
    return out.stdout.split()


def test_allocator_thresholds_are_raised_on_glibc() -> None:
    expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert run_check({}) == [expected, "True"]


def test_operator_malloc_settings_are_respected() -> None:
    assert run_check({"MALLOC_TRIM_THRESHOLD_": "131072"})[0] == "False"


def test_open_files_soft_limit_reaches_hard() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert run_check({})[1] == "True", (soft, hard)
