"""Overload: drive a real `clipdex serve` process at `factor` x its measured capacity and report
what happened: fast 503s for the excess, a kept p99 for the admitted, bounded memory, no crash.

    .venv/bin/python -m tests.reliability.overload --seconds 30

The service runs as a separate process (its RSS comes from /proc, a crash is an exit code) over
a small index the indexer builds with the tiny model. The load generator is open loop: requests
leave on a fixed schedule whatever the answers, over a pool of keep-alive connections written
with bare asyncio streams (an HTTP client library costs more CPU per request than the service
spends admitting or refusing one, and it shares the service's two cores). Latency is counted
from the scheduled send time, so a late generator shows up as latency, never as missing load.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["dog", "cat", "beach", "mountain", "city", "street", "child", "red", "blue", "green",
         "car", "bicycle", "river", "tree", "snow", "people", "running", "table", "moon"]
OK = range(200, 300)
SHED = (503, 429)  # the statuses that mean "refused, come back later"


@dataclass(frozen=True)
class ServeOptions:
    """The service's own overload settings (flags of `clipdex serve`); small on purpose, so that
    the model, not the HTTP stack or the load generator, is what runs out first."""

    max_batch: int = 2
    max_wait_ms: float = 2.0
    queue_size: int = 256
    max_queue_wait_ms: float = 100.0  # ~5 batches: the latency budget of this small service
    model_delay_ms: float = 20.0  # added to every model call: a bigger model's time, no CPU
    extra: tuple[str, ...] = ()  # more `clipdex serve` flags, e.g. ("--max-in-flight", "64")
    model: str = "clipdex-tiny"  # `make soak` also runs the bundled model, with no delay

    def flags(self) -> list[str]:
        return ["--max-batch", str(self.max_batch), "--max-wait-ms", str(self.max_wait_ms),
                "--queue-size", str(self.queue_size),
                "--max-queue-wait-ms", str(self.max_queue_wait_ms), *self.extra]


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


# --------------------------------------------------------------------------- the service


def build_index(folder: Path, clip=None, model: str = "clipdex-tiny") -> Path:
    """A few real images indexed by the indexer with `clip` (else `model`); the index root."""
    from indexer.build import BuildConfig, build
    from retrieval.model import load_model
    from tests.conftest import COLOURS, make_image

    images = folder / "images"
    for name, colour in COLOURS.items():
        make_image(images / f"{name}.png", colour)
    clip = clip if clip is not None else load_model(model, device="cpu")
    build([images], folder / "index", clip, BuildConfig(workers=0, batch_size=8))
    return folder / "index"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# `clipdex serve` with every model call made `delay` ms longer by sleeping (no CPU, the GIL
# released), as a model on an accelerator would be: the tiny model alone is so fast that the
# HTTP stack, not the model, would run out first, and 4x that would saturate the machine.
SLOWED_SERVE = """
import sys, time
assert "api.state" not in sys.modules, "patch the encoders before the service imports them"
import retrieval.encode as encode
def slowed(call, seconds):
    def slow_call(*args, **kwargs):
        time.sleep(seconds)
        return call(*args, **kwargs)
    return slow_call
delay = float(sys.argv[1]) / 1000
encode.encode_texts = slowed(encode.encode_texts, delay)
encode.encode_image_batch = slowed(encode.encode_image_batch, delay)
from retrieval.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start_service(index: Path, port: int, options: ServeOptions, log: Path) -> subprocess.Popen:
    serve = ["serve", "--index", str(index), "--model", options.model, "--device", "cpu",
             "--port", str(port), *options.flags()]
    command = ([sys.executable, "-c", SLOWED_SERVE, str(options.model_delay_ms), *serve]
               if options.model_delay_ms > 0 else [sys.executable, "-m", "retrieval.cli", *serve])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)


def wait_ready(port: int, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited ({process.returncode}):\n"
                               f"{log.read_text()[-3000:]}")
        if get_status(port, "/readyz") == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the service was not ready in {timeout} s:\n{log.read_text()[-3000:]}")


def get_status(port: int, path: str, timeout: float = 5.0) -> int:
    """Status of GET `path`, 0 when the service cannot be reached."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return 0
    finally:
        connection.close()


def model_counters(port: int) -> dict[str, float]:
    """The text batcher's totals from /metrics: batches, inputs and model seconds."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    names = {"clipdex_batch_size_count": "batches", "clipdex_batch_size_sum": "inputs",
             "clipdex_batch_seconds_sum": "seconds"}
    totals = dict.fromkeys(names.values(), 0.0)
    for line in text.splitlines():
        name, _, rest = line.partition('{kind="text"} ')
        if name in names:
            totals[names[name]] = float(rest)
    return totals


def model_summary(before: dict[str, float], after: dict[str, float], elapsed: float) -> dict:
    """What the model did in a phase: batches/s, mean batch size and time."""
    batches = after["batches"] - before["batches"]
    return {"batches_per_s": round(batches / elapsed, 1),
            "mean_batch": round((after["inputs"] - before["inputs"]) / max(batches, 1), 2),
            "mean_batch_ms": round(1000 * (after["seconds"] - before["seconds"])
                                   / max(batches, 1), 2)}


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a live process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


# --------------------------------------------------------------------------- the load


def post_json(port: int, path: str, body: dict) -> bytes:
    """The bytes of one HTTP/1.1 POST of `body` as JSON, for `Pool.send`."""
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload


def request_bytes(port: int, n: int) -> bytes:
    """A text search whose query is distinct per n, so nothing can be cached."""
    words = " ".join(WORDS[(n * 7 + step * 3) % len(WORDS)] for step in range(3 + n % 5))
    return post_json(port, "/search/text", {"text": f"{words} {n}", "k": 5})


class Pool:
    """Keep-alive connections to the service; a request takes an idle one or opens another.
    Failures are counted by kind in `errors`; "pool exhausted" means the generator, not the
    service, ran out (max_connections requests were already waiting)."""

    def __init__(self, port: int, max_connections: int):
        self.port, self.max_connections = port, max_connections
        self.idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        self.open = 0
        self.errors: Counter[str] = Counter()

    async def send(self, payload: bytes, timeout: float) -> int:
        """The response status; 0 when there was none (see `errors`)."""
        connection = await self._connection(timeout)
        if connection is None:
            return 0
        reader, writer = connection
        try:
            writer.write(payload)
            status, keep = await asyncio.wait_for(read_response(reader), timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as error:
            self.errors[type(error).__name__] += 1
            status, keep = 0, False
        if keep:
            self.idle.append((reader, writer))
        else:
            self._drop(writer)
        return status

    async def _connection(self, timeout: float
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        while self.idle:  # the newest first; skip any the server closed while it was idle
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            self._drop(writer)
        if self.open >= self.max_connections:
            self.errors["pool exhausted"] += 1
            return None
        self.open += 1
        try:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port),
                                          timeout)
        except (OSError, asyncio.TimeoutError) as error:
            self.open -= 1
            self.errors[f"connect: {type(error).__name__}"] += 1
            return None

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self.open -= 1
        writer.close()

    def close(self) -> None:
        while self.idle:
            self._drop(self.idle.pop()[1])


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, connection reusable) of one HTTP/1.1 response with a Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "keep-alive") != "close"


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sample_memory(pid: int, peak: dict[str, int], every: float = 0.1) -> None:
    """Keep the largest VmRSS seen in `peak` until cancelled (VmHWM covers the gaps)."""
    while True:
        try:
            peak["rss"] = max(peak.get("rss", 0), memory_kib(pid)["VmRSS"])
        except (OSError, KeyError):
            return
        await asyncio.sleep(every)


# --------------------------------------------------------------------------- the summary


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted seconds, in ms."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def latency_summary(ordered: Sequence[float]) -> dict[str, float | None]:
    return {f"p{int(q * 100)}_ms": percentile(ordered, q) for q in (0.5, 0.95, 0.99)}


def summarise(baseline: Phase, overload: Phase, rate: float) -> dict:
    """Admitted, refused and failed requests of the overload, against the baseline."""
    statuses = Counter(o.status for o in overload.outcomes)
    ok, shed = overload.latencies(OK), overload.latencies(SHED)
    return {
        "capacity_rps": round(baseline.count(OK) / baseline.elapsed, 1),
        "baseline": {"requests": len(baseline.outcomes),
                     "non_2xx": len(baseline.outcomes) - baseline.count(OK),
                     **latency_summary(baseline.latencies(OK))},
        "offered_rps": round(rate, 1), "sent": len(overload.outcomes),
        "admitted": {"count": len(ok), "rps": round(len(ok) / overload.elapsed, 1),
                     **latency_summary(ok)},
        "rejected": {"count": len(shed), **latency_summary(shed),
                     "by_status": {str(s): statuses[s] for s in SHED if statuses[s]}},
        "other_statuses": {str(s): n for s, n in sorted(statuses.items())
                           if s != 0 and s not in SHED and s not in OK},
        "connection_errors": statuses[0], "connection_error_kinds": dict(overload.errors),
        "generator_late_p99_ms": percentile(sorted(overload.late), 0.99),
    }


# --------------------------------------------------------------------------- the run


def run_overload(seconds: float, factor: float = 4.0, *, options: ServeOptions = ServeOptions(),
                 concurrency: int = 8, baseline_seconds: float = 3.0,
                 rss_allowance_mib: float = 256.0, clip=None) -> dict:
    """Measure capacity (closed loop, `concurrency` clients, `baseline_seconds`), then offer
    `factor` x capacity for `seconds` (open loop) to a fresh `clipdex serve` process.

    Returns a JSON-able summary; its rss_bound_mib is the RSS when ready plus the allowance.
    `clip`: the tiny model already loaded (tests pass their fixture), else loaded here.
    """
    with tempfile.TemporaryDirectory(prefix="clipdex-overload-") as tmp:
        folder = Path(tmp)
        index, port, log = build_index(folder, clip, options.model), free_port(), folder / "service.log"
        process = start_service(index, port, options, log)
        try:
            wait_ready(port, process, log)
            ready_kib = memory_kib(process.pid)["VmRSS"]
            summary = asyncio.run(_drive(port, process.pid, seconds, factor, concurrency,
                                         baseline_seconds))
            summary["healthz_after"] = get_status(port, "/healthz")
            summary["alive_after"] = process.poll() is None
            if summary["alive_after"]:
                summary["rss_peak_kib"] = max(summary["rss_peak_kib"],
                                              memory_kib(process.pid)["VmHWM"])
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        summary.update(memory_figures(ready_kib, summary.pop("rss_peak_kib"), rss_allowance_mib))
        summary["exit_code"] = process.returncode  # -15: our SIGTERM; anything else: it died
        summary["service"] = {**asdict(options), "seconds": seconds, "factor": factor}
        if not summary["alive_after"]:
            summary["log_tail"] = log.read_text()[-2000:]
    return summary


def memory_figures(ready_kib: int, peak_kib: int, allowance_mib: float) -> dict[str, float]:
    ready, peak = ready_kib / 1024, peak_kib / 1024
    return {"rss_ready_mib": round(ready, 1), "rss_peak_mib": round(peak, 1),
            "rss_growth_mib": round(peak - ready, 1),
            "rss_bound_mib": round(ready + allowance_mib, 1)}


async def _drive(port: int, pid: int, seconds: float, factor: float, concurrency: int,
                 baseline_seconds: float) -> dict:
    await closed_loop(port, concurrency, 1.0)  # warm-up: first batches, lazy imports
    before = model_counters(port)
    baseline = await closed_loop(port, concurrency, baseline_seconds, first=10**6)
    during = model_counters(port)
    rate = factor * baseline.count(OK) / baseline.elapsed
    peak, cpu = {"rss": memory_kib(pid)["VmRSS"]}, cpu_seconds(pid)
    sampler = asyncio.create_task(sample_memory(pid, peak))
    overload = await open_loop(port, rate, seconds, first=2 * 10**6)
    sampler.cancel()
    summary = summarise(baseline, overload, rate)
    summary["service_cpu_percent"] = round(100 * (cpu_seconds(pid) - cpu) / overload.elapsed)
    summary["model"] = {"baseline": model_summary(before, during, baseline.elapsed),
                        "overload": model_summary(during, model_counters(port),
                                                  overload.elapsed)}
    summary["rss_peak_kib"] = peak["rss"]
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--factor", type=float, default=4.0)
    defaults = ServeOptions()
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--max-queue-wait-ms", type=float, default=defaults.max_queue_wait_ms)
    parser.add_argument("--model-delay-ms", type=float, default=defaults.model_delay_ms)
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--serve-flag", action="append", default=[],
                        help="an extra `clipdex serve` argument; repeatable")
    args = parser.parse_args(argv)
    options = replace(defaults, max_batch=args.max_batch, model_delay_ms=args.model_delay_ms,
                      max_queue_wait_ms=args.max_queue_wait_ms, extra=tuple(args.serve_flag),
                      model=args.model)
    print(json.dumps(run_overload(args.seconds, args.factor, options=options), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
