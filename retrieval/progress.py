"""Progress of long jobs, passed in by the caller: the core reports, the edge draws. A job takes
a `ProgressFactory` (label, total) -> bar; the CLI passes tqdm, a library caller whatever it
likes, and `no_progress` draws nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> Any: ...


ProgressFactory = Callable[[str, int], Bar]  # (label, total) -> a tqdm-like bar


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(label: str, total: int) -> Bar:
    return _NoBar()
