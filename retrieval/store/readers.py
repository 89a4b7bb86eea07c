"""Read-only SQLite connections to a generation's items table: one per thread, each statement
under a time limit, all interrupted when the generation closes.

One shared connection behind a lock let a single slow statement (a pathological ordered
listing took minutes at 200,000 items) hold up every search that needs metadata. A committed
items table never changes (it is opened `immutable=1`), so each thread may read it through
its own connection with no coordination. The connections are as many as the threads that
query (the service's request pool: tens), each with SQLite's own small page cache.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from retrieval.errors import QueryTimeoutError
from retrieval.store import layout

# Seconds one statement may run, its rows' reading included. The heaviest legitimate
# statements (a filter matching every item, a deep ordered listing) take well under a second
# at 200,000 items; 10 s leaves room for ten times that and a loaded machine.
QUERY_SECONDS = 10.0
# SQLite virtual-machine steps between two looks at the clock (about a millisecond of work):
# the look costs a Python call, so per-step checks would slow every statement.
CHECK_EVERY = 20_000
Taken = TypeVar("Taken")


@dataclass
class _Reader:
    db: sqlite3.Connection
    deadline: float = float("inf")  # time.monotonic() at which its statement is stopped
    busy: bool = False


class Readers:
    """The connections of one items table (`path`); safe to use from any number of threads."""

    def __init__(self, path: Path, seconds: float = QUERY_SECONDS):
        self.path, self.seconds = Path(path), float(seconds)
        self._uri = layout.read_only_uri(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[_Reader] = []  # every thread's, so `close` reaches them
        self._closed = False

    def rows(self, sql: str, args: Sequence[Any]) -> list[tuple]:
        """Every row of one statement."""
        return self.take(sql, args, list)

    def take(self, sql: str, args: Sequence[Any], taker: Callable[[Iterable[tuple]], Taken]
             ) -> Taken:
        """`taker(rows)` over a statement's rows as they come (it may stop early); the time
        limit covers the reading too. QueryTimeoutError when it runs past the limit or the
        generation is closed meanwhile."""
        reader = self._reader()
        with self._lock:
            reader.busy, reader.deadline = True, time.monotonic() + self.seconds
        try:
            cursor = reader.db.execute(sql, list(args))
            try:
                return taker(cursor)
            finally:
                cursor.close()
        except sqlite3.OperationalError as error:
            if "interrupted" not in str(error):
                raise
            raise QueryTimeoutError(self._why()) from None
        finally:
            with self._lock:
                reader.busy, reader.deadline = False, float("inf")
                closing = self._closed
            if closing:  # `close` left it to this thread, which was using it
                reader.db.close()

    def close(self) -> None:
        """Stop every running statement now and close every connection (one in use is closed
        by its thread as the interrupted statement returns)."""
        with self._lock:  # who closes each connection is decided under the lock, once
            self._closed = True
            readers, self._all = self._all, []
            for reader in readers:
                if reader.busy:
                    reader.db.interrupt()  # safe from any thread: SQLite sets a flag
            idle = [reader for reader in readers if not reader.busy]
        for reader in idle:
            reader.db.close()

    def _reader(self) -> _Reader:
        reader = getattr(self._local, "reader", None)
        if reader is not None and not self._closed:
            return reader
        with self._lock:
            if self._closed:
                raise QueryTimeoutError(f"generation {self.path.parent.name} was closed")
            db = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
            reader = _Reader(db)
            db.set_progress_handler(lambda: self._closed or time.monotonic() > reader.deadline,
                                    CHECK_EVERY)
            self._all.append(reader)
        self._local.reader = reader
        return reader

    def _why(self) -> str:
        if self._closed:
            return f"generation {self.path.parent.name} was closed while the query ran"
        return (f"the query ran past the {self.seconds:g} s limit on the index's metadata; "
                "narrow its filter or page less deep")
