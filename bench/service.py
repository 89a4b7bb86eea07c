"""Load-test the search service on loopback: throughput and p50/p95/p99 latency of text searches,
with cross-request batching on (--max-batch 32) and off (--max-batch 1), same concurrency.

    .venv/bin/python bench/service.py --model clipdex-effnet-minilm --concurrency 16 \
        --requests 400 --seconds 60

Each mode runs `clipdex serve` in its own process (so the load generator does not share its
GIL) over a synthetic index of random unit vectors written through retrieval.store; the model
is saved once as a checkpoint so the server and the index agree on its identity. Every query
text is distinct, so nothing is cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages

from bench.load import Pool, batch_counters, latency_summary, post_json

WORDS = ["dog", "cat", "beach", "mountain", "city", "street", "child", "red", "blue", "green", "car", "bicycle", "river", "tree", "snow", "people", "running", "sitting", "table", "coffee", "rocket", "moon", "night", "market"]


def prepare(model: str, folder: Path, items: int) -> tuple[Path, Path]:
    """Save `model` as a checkpoint and write a random index for it; (checkpoint, index)."""
    from retrieval.models.identity import model_identity
    from retrieval.models.loading import load_model, save_model
    from retrieval.store import ItemRecord, write_generation

    checkpoint = folder / "model.safetensors"
    save_model(load_model(model, "cpu"), checkpoint)
    clip = load_model(str(checkpoint), "cpu")
    rng = np.random.default_rng(0)

    def unit(count: int) -> np.ndarray:
        vectors = rng.normal(size=(count, clip.embed_dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    records = [ItemRecord(i, "image", path=f"/nonexistent/{i}.jpg") for i in range(items)]
    records += [ItemRecord(items + i, "text", text=f"caption {i}") for i in range(items)]
    index = folder / "index"
    write_generation(index, model_identity(clip), records, {"image": unit(items),
                                                            "text": unit(items)})
    return checkpoint, index


def query_text(n: int) -> str:
    rng = np.random.default_rng(n)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))


async def load(url: str, concurrency: int, requests: int, seconds: float) -> dict:
    """`concurrency` closed-loop clients on keep-alive connections. The client is the overload
    suite's bare-asyncio one: httpx costs about a millisecond of CPU per request, and on a
    2-core machine the load generator's CPU is taken from the server it measures."""
    port = int(url.rsplit(":", 1)[1])
    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds
    pool = Pool(port, concurrency)

    async def worker() -> None:
        nonlocal failures
        for n in counter:
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            status = await pool.send(post_json(port, "/search/text",
                                               {"text": query_text(n), "k": 10}), 60)
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1

    # open every connection and warm up; not measured
    await asyncio.gather(*(pool.send(post_json(port, "/search/text", {"text": f"warm up {n}"}),
                                     60) for n in range(concurrency)))
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    pool.close()
    return {"ok": len(latencies), "failed": failures, "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 1),
            **{name: round(value, 1) for name, value in latency_summary(latencies).items()
               if value is not None},
            "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None}


def serve(checkpoint: Path, index: Path, port: int, max_batch: int, wait_ms: float,
          queue: int, backend: str = "torch") -> subprocess.Popen:
    command = [sys.executable, "-m", "clipdex", "serve", "--index", str(index),
               "--model", str(checkpoint), "--port", str(port), "--max-batch", str(max_batch),
               "--backend", backend,
               "--max-wait-ms", str(wait_ms), "--queue-size", str(queue), "--device", "cpu",
               # every request is served here; shedding under overload is the soak's subject
               "--max-queue-wait-ms", "0", "--max-in-flight", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become ready")


def batch_sizes(url: str) -> float | None:
    """The mean text batch size so far, from the service's /metrics."""
    totals = batch_counters(int(url.rsplit(":", 1)[1]))
    return round(totals["inputs"] / totals["batches"], 2) if totals["batches"] else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipdex-effnet-minilm")
    parser.add_argument("--items", type=int, default=5000, help="images and texts each")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400, help="per mode, at most")
    parser.add_argument("--seconds", type=float, default=60, help="per mode, at most")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, index = prepare(args.model, Path(tmp), args.items)
        for mode, max_batch in (("batched", args.max_batch), ("unbatched", 1)):
            url = f"http://127.0.0.1:{args.port}"
            process = serve(checkpoint, index, args.port, max_batch, args.max_wait_ms,
                            queue=max(256, 4 * args.concurrency))
            try:
                wait_ready(url, process)
                figures = asyncio.run(load(url, args.concurrency, args.requests, args.seconds))
                figures["mean_batch"] = batch_sizes(url)
            finally:
                process.terminate()
                process.wait(timeout=30)
            results[mode] = {"max_batch": max_batch, **figures}
            print(f"{mode:>9}: {json.dumps(results[mode])}", flush=True)
    summary = {"model": args.model, "concurrency": args.concurrency, **results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
