"""Cross-request micro-batching: concurrent encode requests become one model call.

Each request puts its input on a bounded asyncio queue and awaits a future. One collector task
per batcher takes the first waiting input, gathers more until `max_batch` or `max_wait_ms`,
and runs the batch function on a worker thread shared by all batchers (one model, one thread:
the event loop never blocks on the model).

The queue is bounded twice. `queue_size` caps it in inputs; `max_queue_wait_ms` caps it in time,
which is what a client feels: an input is refused at once (`QueueFullError`, HTTP 503) when the
full batches already waiting ahead of it would take longer than that to encode, at the recent
batch time. Under overload the excess is then shed in microseconds and the admitted keep their
latency, instead of every request waiting out a queue sized for a faster model. The estimate
counts this batcher's batches only: under mixed text and image overload the other batcher's
batches, interleaved on the shared thread, stretch a wait by a bounded factor beyond it.
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
    # How long the first input waits for company. 0: none; while the model is busy the
    # queue fills, so batches still form under load and a lone request never waits
    # (bench: same req/s at concurrency 32 as 5 ms, and concurrency 1 as fast as unbatched).
    max_wait_ms: float = 0.0
    queue_size: int = 256  # inputs waiting beyond the batch being encoded
    max_queue_wait_ms: float | None = 500.0  # expected wait that refuses an input; None: off


@dataclass
class BatcherStats:
    submitted: int = 0
    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    rejected: int = 0  # refused on arrival: queue full or expected wait over the budget
    batch_seconds: float | None = None  # moving average of the model call time


# How fast the batch-time average follows: ~5 batches of memory, enough to forget a cold start.
BATCH_TIME_SMOOTHING = 0.2


class MicroBatcher(Generic[Input, Output]):
    """`await submit(x)` -> `fn([.., x, ..])[i]`, with fn run on `executor` in batches."""

    def __init__(self, name: str, fn: Callable[[list[Input]], Sequence[Output]],
                 executor: Executor, config: BatcherConfig,
                 on_batch: Callable[[str, int, float], None] | None = None):
        if (config.max_batch < 1 or config.queue_size < 1 or config.max_wait_ms < 0
                or (config.max_queue_wait_ms is not None and config.max_queue_wait_ms <= 0)):
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

    def expected_wait(self) -> float:
        """Seconds a new input would wait for the full batches queued ahead of it (0 until a
        batch has been timed). The batch in progress and a partial batch are not counted: a
        lone request cannot be served sooner, so refusing it would only lose it."""
        batch_seconds = self.stats.batch_seconds or 0.0
        return (self.depth // self.config.max_batch) * batch_seconds

    async def submit(self, item: Input) -> Output:
        if self._queue is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        self.stats.submitted += 1
        budget = self.config.max_queue_wait_ms
        if budget is not None and self.expected_wait() * 1000 > budget:
            self.stats.rejected += 1
            raise QueueFullError(f"the {self.name} encoding queue is {self.depth} deep, "
                                 f"about {self.expected_wait() * 1000:.0f} ms of work, over "
                                 f"the {budget:g} ms budget")
        future = asyncio.get_running_loop().create_future()
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
            timing = [0.0]
            try:
                outputs = await loop.run_in_executor(self.executor, self._timed, inputs, timing)
                error = None
            except Exception as failure:  # noqa: BLE001 - each waiter gets it; the loop lives on
                outputs, error = [], failure
            self._record(len(batch), timing[0])
            for index, (_, future) in enumerate(batch):
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(outputs[index])

    def _timed(self, inputs: list[Input], timing: list[float]) -> Sequence[Output]:
        """fn(inputs), its time written to timing[0]: the model's own time, not the wait for
        the shared thread (that wait is the other batcher's work, not this batch's cost)."""
        started = time.perf_counter()
        try:
            return self.fn(inputs)
        finally:
            timing[0] = time.perf_counter() - started

    def _record(self, size: int, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.items += size
        self.stats.largest_batch = max(self.stats.largest_batch, size)
        previous = self.stats.batch_seconds
        self.stats.batch_seconds = (seconds if previous is None else
                                    previous + BATCH_TIME_SMOOTHING * (seconds - previous))
        if self.on_batch is not None:
            self.on_batch(self.name, size, seconds)
