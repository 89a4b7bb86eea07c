"""The load generator of `make bench` and of the overload soak: open and closed loops of HTTP/1.1
requests over keep-alive connections, the protocol spoken by h11 over asyncio streams (a full
client library costs more CPU per request than the service spends admitting or refusing one,
and it shares the service's two cores), latency percentiles by numpy, and the service's own
counters read with prometheus_client's parser.

Latency is counted from the scheduled send time in the open loop, so a late generator shows up
as latency, never as missing load.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

WORDS = ["dog", "cat", "beach", "mountain", "city", "street", "child", "red", "blue", "green",
         "car", "bicycle", "river", "tree", "snow", "people", "running", "table", "moon"]
OK = range(200, 300)
SHED = (503, 429)  # the statuses that mean "refused, come back later"


@dataclass(frozen=True)
class Outgoing:
    """One request to send: h11 frames it on each connection."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""


@dataclass
class Outcome:
    """One request: its status (0: connection error) and seconds from its scheduled start."""

    status: int
    seconds: float


@dataclass
class Phase:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed: float = 0.0
    late: list[float] = field(default_factory=list)  # how far behind schedule sends left
    errors: Counter[str] = field(default_factory=Counter)  # connection failures by kind

    def latencies(self, statuses: Sequence[int]) -> list[float]:
        return sorted(o.seconds for o in self.outcomes if o.status in statuses)

    def count(self, statuses: Sequence[int]) -> int:
        return sum(o.status in statuses for o in self.outcomes)


def post_json(port: int, path: str, body: dict) -> Outgoing:
    payload = json.dumps(body).encode()
    return Outgoing("POST", path, (("host", f"127.0.0.1:{port}"),
                                   ("content-type", "application/json"),
                                   ("content-length", str(len(payload)))), payload)


def request_bytes(port: int, n: int) -> Outgoing:
    """A text search whose query is distinct per n, so nothing can be cached."""
    words = " ".join(WORDS[(n * 7 + step * 3) % len(WORDS)] for step in range(3 + n % 5))
    return post_json(port, "/search/text", {"text": f"{words} {n}", "k": 5})


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))


class Pool:
    """Keep-alive connections to the service; a request takes an idle one or opens another.
    Failures are counted by kind in `errors`; "pool exhausted" means the generator, not the
    service, ran out (max_connections requests were already waiting)."""

    def __init__(self, port: int, max_connections: int):
        self.port, self.max_connections = port, max_connections
        self.idle: deque[_Connection] = deque()
        self.open = 0
        self.errors: Counter[str] = Counter()

    async def send(self, request: Outgoing, timeout: float) -> int:
        """The response status; 0 when there was none (see `errors`)."""
        connection = await self._connection(timeout)
        if connection is None:
            return 0
        try:
            connection.writer.write(_frame(connection.protocol, request))
            status = await asyncio.wait_for(read_response(connection), timeout)
            keep = _reusable(connection.protocol)
        except (OSError, asyncio.TimeoutError, h11.ProtocolError) as error:
            self.errors[type(error).__name__] += 1
            status, keep = 0, False
        if keep:
            self.idle.append(connection)
        else:
            self._drop(connection)
        return status

    async def _connection(self, timeout: float) -> _Connection | None:
        while self.idle:  # the newest first; skip any the server closed while it was idle
            connection = self.idle.pop()
            if not connection.reader.at_eof() and not connection.writer.is_closing():
                return connection
            self._drop(connection)
        if self.open >= self.max_connections:
            self.errors["pool exhausted"] += 1
            return None
        self.open += 1
        try:
            streams = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port),
                                             timeout)
        except (OSError, asyncio.TimeoutError) as error:
            self.open -= 1
            self.errors[f"connect: {type(error).__name__}"] += 1
            return None
        return _Connection(*streams)

    def _drop(self, connection: _Connection) -> None:
        self.open -= 1
        connection.writer.close()

    def close(self) -> None:
        while self.idle:
            self._drop(self.idle.pop())


def _frame(protocol: h11.Connection, request: Outgoing) -> bytes:
    head = protocol.send(h11.Request(method=request.method, target=request.target,
                                     headers=list(request.headers)))
    return head + protocol.send(h11.Data(data=request.body)) + protocol.send(h11.EndOfMessage())


async def read_response(connection: _Connection) -> int:
    """The status of one response, its body read to the end."""
    protocol, status = connection.protocol, 0
    while True:
        event = protocol.next_event()
        if event is h11.NEED_DATA:
            data = await connection.reader.read(65536)
            protocol.receive_data(data)  # b"" means the peer closed
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            return status
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("closed before the response ended")


def _reusable(protocol: h11.Connection) -> bool:
    if protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
        protocol.start_next_cycle()
        return True
    return False


async def open_loop(port: int, rate: float, seconds: float, first: int = 0,
                    max_connections: int = 2048, timeout: float = 30.0) -> Phase:
    """Send `rate` requests/s for `seconds` on schedule, whatever the answers."""
    pool, phase, tasks = Pool(port, max_connections), Phase(), set()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(n: int, due: float) -> None:
        status = await pool.send(request_bytes(port, n), timeout)
        phase.outcomes.append(Outcome(status, loop.time() - due))

    for n in range(int(rate * seconds)):
        due = started + n / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        phase.late.append(max(0.0, -delay))
        task = loop.create_task(one(first + n, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    phase.elapsed, phase.errors = loop.time() - started, pool.errors
    pool.close()
    return phase


async def closed_loop(port: int, concurrency: int, seconds: float, first: int = 0) -> Phase:
    """`concurrency` clients, each sending its next request when the last one is answered."""
    pool, phase = Pool(port, concurrency), Phase()
    loop = asyncio.get_running_loop()
    started = loop.time()
    counter = iter(range(first, first + 10**9))

    async def client() -> None:
        while loop.time() - started < seconds:
            sent = loop.time()
            status = await pool.send(request_bytes(port, next(counter)), 30.0)
            phase.outcomes.append(Outcome(status, loop.time() - sent))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    phase.elapsed, phase.errors = loop.time() - started, pool.errors
    pool.close()
    return phase


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation) of latencies in s, in ms."""
    if len(seconds) == 0:
        return None
    return round(float(np.percentile(seconds, q)) * 1000, 2)


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}_ms": percentile_ms(seconds, q) for q in (50, 95, 99)}


def batch_counters(port: int, kind: str = "text") -> dict[str, float]:
    """One batcher's totals from the service's /metrics: batches, inputs and model seconds."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    names = {"clipdex_batch_size_count": "batches", "clipdex_batch_size_sum": "inputs",
             "clipdex_batch_seconds_sum": "seconds"}
    totals = dict.fromkeys(names.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names and sample.labels.get("kind") == kind:
                totals[names[sample.name]] = float(sample.value)
    return totals
