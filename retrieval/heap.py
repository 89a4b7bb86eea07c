"""The process heap: handing freed memory back to the system, and bounding glibc's arenas.

glibc keeps freed blocks in its arenas, one arena per thread that allocated (up to eight per
core), and counts them in the process's resident memory for good: a service whose request
threads decoded uploads and parsed large bodies sat at twice its starting RSS, idle. A trim
returns the free pages of every arena; fewer arenas leave less to fragment. Both are no-ops
where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

M_ARENA_MAX = -8  # mallopt's parameter number (glibc's malloc.h)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_TRIM: Callable[[int], int] | None = getattr(_LIBC, "malloc_trim", None)
_MALLOPT: Callable[[int, int], int] | None = getattr(_LIBC, "mallopt", None)


def release_freed_memory() -> None:
    """malloc_trim(0): every arena's free pages go back to the kernel."""
    if _TRIM is not None:
        _TRIM(0)


def cap_arenas(count: int) -> None:
    """At most `count` malloc arenas from now on (threads beyond share them; 0: glibc's
    default); call it before the threads that allocate start."""
    if _MALLOPT is not None and count > 0:
        _MALLOPT(M_ARENA_MAX, int(count))


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
