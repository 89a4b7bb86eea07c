"""The micro-batcher on its own: batches form, the queue bound refuses, errors reach callers."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from retrieval.search.batcher import BatcherConfig, MicroBatcher, QueueFullError


def _run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_submissions_share_one_call():
    calls = []

    def double(items):
        calls.append(list(items))
        return [2 * item for item in items]

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", double, pool, BatcherConfig(8, 50, 64))
            batcher.start()
            results = await asyncio.gather(*(batcher.submit(n) for n in range(5)))
            await batcher.stop()
        return results

    assert _run(scenario()) == [0, 2, 4, 6, 8]
    assert calls == [[0, 1, 2, 3, 4]]


def test_max_batch_one_turns_batching_off():
    calls = []

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", lambda xs: calls.append(xs) or xs, pool,
                                   BatcherConfig(1, 50, 64))
            batcher.start()
            await asyncio.gather(*(batcher.submit(n) for n in range(4)))
            await batcher.stop()

    _run(scenario())
    assert [len(call) for call in calls] == [1, 1, 1, 1]


def test_full_queue_refuses_at_once_and_errors_reach_every_waiter():
    gate = threading.Event()

    def blocked(items):
        gate.wait(5)
        raise ValueError("boom")

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", blocked, pool, BatcherConfig(1, 0, 2))
            batcher.start()
            first = asyncio.ensure_future(batcher.submit(0))
            await asyncio.sleep(0.05)  # the collector takes it and blocks in the pool
            queued = [asyncio.ensure_future(batcher.submit(n)) for n in (1, 2)]
            await asyncio.sleep(0)
            with pytest.raises(QueueFullError):
                await batcher.submit(3)
            assert batcher.stats.rejected == 1
            gate.set()
            outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
            await batcher.stop()
        return outcomes

    assert all(isinstance(outcome, ValueError) for outcome in _run(scenario()))


def test_a_queue_longer_than_the_wait_budget_refuses_at_once():
    gate = threading.Event()

    async def scenario():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", lambda xs: xs, pool, BatcherConfig(2, 0, 64, 100))
            batcher.start()
            batcher.stats.batch_seconds = 0.030  # as timed on earlier batches: 30 ms for 2
            pool.submit(gate.wait, 5)  # the model thread is busy
            queued = [asyncio.ensure_future(batcher.submit(n)) for n in range(8)]
            await asyncio.sleep(0.05)  # 0 and 1 form a batch that waits for the model; 6 queue
            assert batcher.depth == 6
            assert batcher.expected_wait() == pytest.approx(0.090)  # 3 full batches ahead
            queued += [asyncio.ensure_future(batcher.submit(n)) for n in (8, 9)]  # still 3
            await asyncio.sleep(0)
            with pytest.raises(QueueFullError, match="budget"):
                await batcher.submit(10)  # 4 full batches ahead: 120 ms > 100 ms
            gate.set()
            results = await asyncio.gather(*queued)
            await batcher.stop()
        return results, batcher.stats

    results, stats = _run(scenario())
    assert results == list(range(10)) and stats.rejected == 1

