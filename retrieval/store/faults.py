"""Fault points for the crash tests: a writer calls `fault_point("before_current")` at the
moments where a kill matters, and nothing happens unless the process was started with
CLIPDEX_FAULT set. The variable is read once, at import; unset, `fault_point` is a function
that returns at once (no environment lookup, no string work on the write path).

    CLIPDEX_FAULT=point[:n]        SIGKILL this process there
    CLIPDEX_FAULT=stall:point[:n]  sleep (600 s) so a test can kill it from outside
    CLIPDEX_FAULT=pause:point[:n]  stop it (SIGSTOP) until a test sends SIGCONT, then go on

Points: `mid_generation` (files written, no manifest yet), `before_current` (the generation
is renamed into place, CURRENT not yet switched), `after_shard:<n>` (an indexing job has
committed shard n). Used by tests/reliability/crash_loop.py, tests/test_indexer.py and
tests/indexer/test_concurrent_writers.py, which start `clipdex index` subprocesses.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Protocol


class FaultPoint(Protocol):
    def __call__(self, point: str, number: int | None = None) -> None: ...


def _never(point: str, number: int | None = None) -> None:
    """The installed hook when CLIPDEX_FAULT is unset."""


def hook(spec: str) -> FaultPoint:
    """The fault point function for one CLIPDEX_FAULT value ("" gives the no-op)."""
    if not spec:
        return _never
    mode, _, target = spec.partition(":")
    if mode not in ("stall", "pause"):
        mode, target = "kill", spec

    def fault(point: str, number: int | None = None) -> None:
        if target != (point if number is None else f"{point}:{number}"):
            return
        if mode == "stall":
            time.sleep(600)
        elif mode == "pause":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        os.kill(os.getpid(), signal.SIGKILL)

    return fault


fault_point: FaultPoint = hook(os.environ.get("CLIPDEX_FAULT", ""))
