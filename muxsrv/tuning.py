"""Process-wide tuning at start-up: open-files limit and the C allocator.

Both are settings of the process, not of the server, so they live here, run
once by the CLI before the loop starts, and never fail the start: on a system
where one does not apply it is skipped.

The allocator: glibc serves allocations above its ``M_MMAP_THRESHOLD`` with a
fresh ``mmap`` and returns freed memory above ``M_TRIM_THRESHOLD`` at the top
of the heap to the kernel.  For a server whose messages are often a megabyte,
that means every large message's buffers are mapped, page-faulted in page by
page, and unmapped again: measured here, that halves bulk throughput (8
connections echoing 1 MiB frames: 1.4 GB/s tuned off, 3.3 GB/s on).  Raising
both thresholds keeps buffers up to 32 MiB in the heap and lets up to 64 MiB
of freed heap stay mapped for reuse: a bounded cost in resident memory after a
burst, in exchange for no page faults per message.  An operator who sets
``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` keeps their values.

Giving memory back: the trim threshold only returns the heap's top, and an
attack's buffers, freed in any order, leave the heap fragmented under a few
live objects, so its peak would stay resident for ever.  ``release_free_memory``
(glibc's ``malloc_trim(0)``, which also returns free pages in the middle of
the heap) is called by the limits' sweep after the bytes held for clients
have dropped a lot (``muxsrv.limits.MemoryReturn``), never per message.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
from collections.abc import Callable
from typing import Final, cast

__all__ = ["keep_large_buffers_mapped", "raise_open_files_limit", "release_free_memory"]

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
#: The largest M_MMAP_THRESHOLD glibc accepts on 64-bit systems.
MMAP_THRESHOLD: Final = 32 * 1024 * 1024
TRIM_THRESHOLD: Final = 64 * 1024 * 1024


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def keep_large_buffers_mapped() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); True if done."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return cast("Callable[[int], int]", trim)


def release_free_memory() -> bool:
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim(0)``); True if any.

    Costs about a millisecond per 100 MB of heap; False where there is no such call.
    """
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
