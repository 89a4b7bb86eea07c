"""Cross-request micro-batching: concurrent encode requests become one model call.

Each request puts its input on a bounded asyncio queue and awaits a future. One collector task
per batcher takes the first waiting input, gathers more until `max_batch` or `max_wait_ms`,
and runs the batch function on a worker thread shared by all batchers (one model, one thread:
the event loop never blocks on the model). A full queue refuses at once (`QueueFullError`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

Input = TypeVar("Input")
Output = TypeVar("Output")


class QueueFullError(Exception):
    """The batcher's queue is full; the caller should retry later (HTTP 503 Retry-After)."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 32  # 1 turns batching off
    max_wait_ms: float = 5.0  # how long the first input waits for company
    queue_size: int = 256  # inputs waiting beyond the batch being encoded


@dataclass
class BatcherStats:
    submitted: int = 0
    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    rejected: int = 0


class MicroBatcher(Generic[Input, Output]):
    """`await submit(x)` -> `fn([.., x, ..])[i]`, with fn run on `executor` in batches."""

    def __init__(self, name: str, fn: Callable[[list[Input]], Sequence[Output]],
                 executor: Executor, config: BatcherConfig,
                 on_batch: Callable[[str, int, float], None] | None = None):
        if config.max_batch < 1 or config.queue_size < 1 or config.max_wait_ms < 0:
            raise ValueError(f"bad batcher config {config}")
        self.name, self.fn, self.executor, self.config = name, fn, executor, config
        self.on_batch = on_batch  # (name, batch size, seconds) after every model call
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[tuple[Input, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Inputs waiting in the queue (not counting the batch being encoded)."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.config.queue_size)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(QueueFullError("the service is shutting down"))

    async def submit(self, item: Input) -> Output:
        if self._queue is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        future = asyncio.get_running_loop().create_future()
        self.stats.submitted += 1
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            self.stats.rejected += 1
            raise QueueFullError(f"the {self.name} encoding queue is full "
                                 f"({self.config.queue_size} waiting)") from None
        return await future

    async def _gather(self) -> list[tuple[Input, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while len(batch) < self.config.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        # A client that went away cancelled its future: do not encode for it.
        return [(item, future) for item, future in batch if not future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            inputs = [item for item, _ in batch]
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self.executor, self.fn, inputs)
                error = None
            except Exception as failure:  # noqa: BLE001 - each waiter gets it; the loop lives on
                outputs, error = [], failure
            self._record(len(batch), time.perf_counter() - started)
            for index, (_, future) in enumerate(batch):
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(outputs[index])

    def _record(self, size: int, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.items += size
        self.stats.largest_batch = max(self.stats.largest_batch, size)
        if self.on_batch is not None:
            self.on_batch(self.name, size, seconds)
