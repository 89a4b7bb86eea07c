"""An index larger than RAM, end to end: synthetic clip-retrieval output written in chunks,
`clipdex index build --from-embeddings` under a memory budget, then `clipdex serve` answering
vector queries one per call; peak memory of both processes, recall@10 against exact search
(streamed over the stored vectors), queries/s and build time.

    .venv/bin/python bench/scale_disk.py --count 10000000 --max-memory 2GB   # the goal size
    .venv/bin/python bench/scale_disk.py --count 2000000 --max-memory 1GB --index-type ivfpq-disk

The vectors are `bench/ann.py`'s CLIP-like data (a 32-dimensional concept space, a modality
gap), generated a partition at a time as float16 (what clip-retrieval writes), so neither
this script nor the build ever holds them all: 10,000,000 x 512 is 10 GB on disk as float16
and 20 GB as the float32 the store keeps. 2,000 captions, stored as free texts, are what the
store tunes the index on; 100 other captions are the queries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service import wait_ready
from retrieval.ann import rowscan
from retrieval.store import open_generation

LATENT, TUNING_TEXTS, QUERIES, K = 32, 2000, 100, 10


def write_corpus(folder: Path, count: int, dim: int, partition: int,
                 seed: int = 0) -> np.ndarray:
    """clip-retrieval's layout in `folder` (image partitions, then one of captions only);
    returns the (QUERIES, d) held-out query captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    gap = rng.standard_normal(dim, dtype=np.float32)
    gap *= 0.5 * np.sqrt(dim) / np.linalg.norm(gap)
    picked = np.sort(rng.choice(count, TUNING_TEXTS + QUERIES, replace=False))
    captions = np.empty((len(picked), dim), np.float32)
    parts = -(-count // partition) + 1
    width = len(str(parts - 1))
    for folder_name in ("img_emb", "text_emb", "metadata"):
        (folder / folder_name).mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, count, partition)):
        rows = min(partition, count - start)
        concepts = rng.standard_normal((rows, LATENT), dtype=np.float32) @ basis
        concepts += 0.1 * rng.standard_normal((rows, dim), dtype=np.float32)
        np.save(folder / "img_emb" / f"img_emb_{number:0{width}d}.npy",
                _unit(concepts + gap).astype(np.float16))
        mine = (picked >= start) & (picked < start + rows)
        noise = 0.3 * rng.standard_normal((int(mine.sum()), dim), dtype=np.float32)
        captions[mine] = _unit(concepts[picked[mine] - start] + noise - gap)
        paths = [f"img/{i:09d}.jpg" for i in range(start, start + rows)]
        pq.write_table(pa.table({"image_path": paths, "caption": [None] * rows}),
                       folder / "metadata" / f"metadata_{number:0{width}d}.parquet")
    order = rng.permutation(len(picked))  # tuning texts and queries from all over the corpus
    texts, queries = captions[order[:TUNING_TEXTS]], captions[order[TUNING_TEXTS:]]
    last = f"{parts - 1:0{width}d}"
    np.save(folder / "text_emb" / f"text_emb_{last}.npy", texts.astype(np.float16))
    pq.write_table(pa.table({"image_path": [None] * len(texts),
                             "caption": [f"caption {i}" for i in range(len(texts))]}),
                   folder / "metadata" / f"metadata_{last}.parquet")
    return queries


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def build(corpus: Path, out: Path, max_memory: str, index_type: str | None,
          target_recall: float | None = None) -> dict:
    """Run the build as its own process; its peak RSS is its VmHWM, read until it exits.
    (getrusage's RUSAGE_CHILDREN will not do: the kernel counts a child's pre-exec copy of
    this process, so a child looks as big as its parent was when it was started.)"""
    command = [sys.executable, "-m", "clipdex", "index", "build", "--from-embeddings",
               str(corpus), "--out", str(out), "--model", "external:synthetic",
               "--max-memory", max_memory]
    command += ["--index-type", index_type] if index_type else []
    command += ["--target-recall", str(target_recall)] if target_recall else []
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr, text=True)
        peak_kib = 0
        while process.poll() is None:
            peak_kib = max(peak_kib, _high_water_kib(process.pid))
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        stdout.seek(0), stderr.seek(0)
        if process.returncode:
            raise RuntimeError(f"build failed: {stderr.read()[-3000:]}")
        text = stdout.read()
    return {"build_s": round(seconds, 1), "build_peak_rss_mib": round(peak_kib / 1024, 1),
            "summary": json.loads(text[text.index("{"):])}


def _high_water_kib(pid: int) -> int:
    """VmHWM of a live process (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines()
                 if line.startswith("VmHWM:")), 0)


def serve(out: Path, queries: np.ndarray, port: int) -> dict:
    """`clipdex serve` on the index; /search/vector one query per call; its peak RSS."""
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "clipdex", "serve", "--index", str(out), "--port", str(port),
         "--device", "cpu"], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, process, timeout=600)
        found = []
        with httpx.Client(base_url=url, timeout=60) as http:
            http.post("/search/vector", json={"vector": queries[0].tolist(), "k": K})
            started = time.perf_counter()
            for query in queries:
                response = http.post("/search/vector", json={"vector": query.tolist(), "k": K})
                response.raise_for_status()
                found.append([hit["id"] for hit in response.json()["hits"]])
            seconds = time.perf_counter() - started
        peak = _high_water_kib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"found": found, "qps": round(len(queries) / seconds, 1),
            "serve_peak_rss_mib": round(peak / 1024, 1)}


def exact(out: Path, queries: np.ndarray) -> list[list[int]]:
    """The true top-k ids, streaming over the stored image vectors (never loaded whole)."""
    with open_generation(out) as generation:
        ids, vectors = generation.all_vectors("image")
        return ids[rowscan.exact_neighbours(vectors, queries, K)].tolist()


def measure(count: int, dim: int, max_memory: str, index_type: str | None, partition: int,
            work: Path, port: int, target_recall: float | None = None) -> dict:
    corpus, out = work / "corpus", work / "index"
    started = time.perf_counter()
    queries = write_corpus(corpus, count, dim, partition)
    result = {"count": count, "dim": dim, "max_memory": max_memory, "index_type": index_type,
              "corpus_s": round(time.perf_counter() - started, 1),
              "target_recall": target_recall}
    result.update(build(corpus, out, max_memory, index_type, target_recall))
    shutil.rmtree(corpus)  # the store keeps its own float32 copy; make room for nothing else
    served = serve(out, queries, port)
    truth = exact(out, queries)
    recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(served.pop("found"), truth)])
    with open_generation(out) as generation:
        spec = generation.index_spec("image")
    result.update(served, recall_at_10=round(float(recall), 4), kind=spec.kind,
                  factory=spec.factory, params=spec.params)
    return result


def probe(index: Path, queries: int = 200) -> dict:
    """Where a lone query's time goes, in process on a kept index (`--keep`): the stored
    captions one per call, with the image vectors' pages as the build left them, warm, and
    evicted from the page cache (what the re-rank's reads of images.npy cost)."""
    with open_generation(index) as generation:
        _ids, vectors = generation.all_vectors("text")
        asked = np.asarray(vectors[:queries], dtype=np.float32)
        stored = generation.path / "images.npy"

        def per_query_ms() -> float:
            started = time.perf_counter()
            for query in asked:
                generation.search("image", query[None], K)
            return round((time.perf_counter() - started) / len(asked) * 1e3, 2)

        out = {"queries": len(asked), "as_left_ms": per_query_ms(), "warm_ms": per_query_ms()}
        descriptor = os.open(stored, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
        out["vectors_evicted_ms"] = per_query_ms()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--max-memory", default="2GB")
    parser.add_argument("--index-type", default=None, help="default: what the store chooses")
    parser.add_argument("--partition", type=int, default=1_000_000,
                        help="rows per clip-retrieval partition (its default)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder (default: a temporary one; needs ~3 bytes a "
                             "dimension per vector)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--keep", type=Path, default=None,
                        help="move the built index here instead of deleting it")
    parser.add_argument("--target-recall", type=float, default=None,
                        help="index build --target-recall (default: the store's, 0.95)")
    parser.add_argument("--probe", type=Path, default=None,
                        help="only time lone queries in process on an index kept by --keep")
    args = parser.parse_args(argv)
    if args.probe is not None:
        print(json.dumps(probe(args.probe), indent=2))
        return 0
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        result = measure(args.count, args.dim, args.max_memory, args.index_type,
                         args.partition, Path(work), args.port, args.target_recall)
        if args.keep is not None:  # for follow-up measurements without a rebuild
            shutil.move(str(Path(work) / "index"), str(args.keep))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
