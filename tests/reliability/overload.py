"""Overload: drive a real `clipdex serve` process at `factor` x its measured capacity and report
what happened: fast 503s for the excess, a kept p99 for the admitted, bounded memory, no crash.

    .venv/bin/python -m tests.reliability.overload --seconds 30

The service runs as a separate process (its RSS comes from /proc, a crash is an exit code) over
a small index the indexer builds with the tiny model. The load generator (bench/load.py) is
open loop: requests leave on a fixed schedule whatever the answers, and latency is counted from
the scheduled send time, so a late generator shows up as latency, never as missing load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.load import (
    OK,
    SHED,
    Phase,
    batch_counters,
    closed_loop,
    latency_summary,
    open_loop,
    percentile_ms,
)
from tests.support.process import get_status, start, stop, wait_ready

ROOT = Path(__file__).resolve().parents[2]


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


# --------------------------------------------------------------------------- the service


def build_index(folder: Path, clip=None, model: str = "clipdex-tiny") -> Path:
    """A few real images indexed by the indexer with `clip` (else `model`); the index root."""
    from indexer.build import BuildConfig, build
    from retrieval.models.loading import load_model
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
import retrieval.models.inference as encode
def slowed(call, seconds):
    def slow_call(*args, **kwargs):
        time.sleep(seconds)
        return call(*args, **kwargs)
    return slow_call
delay = float(sys.argv[1]) / 1000
encode.encode_texts = slowed(encode.encode_texts, delay)
encode.encode_image_batch = slowed(encode.encode_image_batch, delay)
from clipdex.main import main
sys.exit(main(sys.argv[2:]))
"""


def start_service(index: Path, port: int, options: ServeOptions, log: Path) -> subprocess.Popen:
    serve = ["serve", "--index", str(index), "--model", options.model, "--device", "cpu",
             "--port", str(port), *options.flags()]
    command = ([sys.executable, "-c", SLOWED_SERVE, str(options.model_delay_ms), *serve]
               if options.model_delay_ms > 0 else [sys.executable, "-m", "clipdex", *serve])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return start(command, log, env, ROOT)


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
        "generator_late_p99_ms": percentile_ms(overload.late, 99),
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
            stop(process)
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
    before = batch_counters(port)
    baseline = await closed_loop(port, concurrency, baseline_seconds, first=10**6)
    during = batch_counters(port)
    rate = factor * baseline.count(OK) / baseline.elapsed
    peak, cpu = {"rss": memory_kib(pid)["VmRSS"]}, cpu_seconds(pid)
    sampler = asyncio.create_task(sample_memory(pid, peak))
    overload = await open_loop(port, rate, seconds, first=2 * 10**6)
    sampler.cancel()
    summary = summarise(baseline, overload, rate)
    summary["service_cpu_percent"] = round(100 * (cpu_seconds(pid) - cpu) / overload.elapsed)
    summary["model"] = {"baseline": model_summary(before, during, baseline.elapsed),
                        "overload": model_summary(during, batch_counters(port),
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
