"""Filtered search through the whole Searcher (SQLite for the matches, then exact or FAISS
with an id selector): recall@10 against exact search over the filtered subset, queries/s one
query per call, and short pages (fewer than min(10, matches) hits), at selectivities from
50 % to 0.01 %, beside unfiltered search (recall and queries/s) on the same index; then the
latency of keyword (BM25) and hybrid searches next to vector search on that index.

The data are `bench/ann.py`'s CLIP-like vectors: images, and noisy "captions" of some of
them stored as texts, so the index is tuned as a real one is (cross-modal queries to 0.95
recall); the queries are other noisy captions. Every image carries a `tags` string of three
words from a Zipf-distributed vocabulary of 5,000, so the keyword index holds every item.

    python -m bench.filtered [--count 100000] [--dim 512] [--kind hnsw] [--queries 200]
                             [--search-threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script or from run_all

from bench.ann import gap_data
from retrieval.models.identity import ModelIdentity
from retrieval.search.query import Query
from retrieval.search.searcher import Searcher
from retrieval.store import ItemRecord, StoreOptions, open_generation, write_generation

SELECTIVITIES = (0.5, 0.05, 0.005, 0.0001)
K = 10
VOCABULARY = 5000
MODES = ("vector", "keyword", "hybrid")


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _run(searcher: Searcher, queries: np.ndarray, where: dict | None) -> tuple[list, float]:
    searcher.search(Query.vector(queries[0].tolist(), k=K, filter=where))  # warm the caches
    started = time.perf_counter()
    found = [[hit.id for hit in searcher.search(Query.vector(q.tolist(), k=K,
                                                             filter=where)).hits]
             for q in queries]
    return found, len(queries) / (time.perf_counter() - started)


def _tags(count: int, rng: np.random.Generator) -> list[str]:
    words = np.minimum(rng.zipf(1.3, size=(count, 3)), VOCABULARY)
    return [" ".join(f"w{w}" for w in row) for row in words]


def _ask(searcher: Searcher, query: np.ndarray, mode: str, keywords: str | None) -> None:
    searcher.search(Query.vector(query.tolist(), k=K, mode=mode, keywords=keywords))


def _modes(searcher: Searcher, queries: np.ndarray, rng: np.random.Generator) -> dict:
    """p50 / p95 latency (ms) and queries/s, one query per call, of each search mode with
    the same vectors and two tag words of middling frequency as the keywords."""
    words = [f"w{a} w{b}" for a, b in rng.integers(10, 200, size=(len(queries), 2))]
    out = {}
    for mode in MODES:
        keywords = [None] * len(queries) if mode == "vector" else words
        _ask(searcher, queries[0], mode, keywords[0])  # warm the caches
        latencies = []
        for query, keyword in zip(queries, keywords, strict=True):
            started = time.perf_counter()
            _ask(searcher, query, mode, keyword)
            latencies.append(time.perf_counter() - started)
        out[mode] = {"p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
                     "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 2),
                     "qps": round(len(latencies) / sum(latencies), 1)}
        print(json.dumps({mode: out[mode]}), flush=True)
    return out


def _clouds(count: int, dim: int, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, 1000 captions stored as texts (the cross-modal queries the store tunes the
    index on) and `queries` other captions to ask, from `bench/ann.py`'s CLIP-like data (a
    low-dimensional concept space, a modality gap; i.i.d. 512-d clouds would make every
    top-10 a near-tie that no index resolves)."""
    images, captions = gap_data(count, 1000 + queries, dim)
    return images, captions[:1000], captions[1000:]


def measure(count: int, dim: int, kind: str | None, queries: int, folder: Path,
            threads: int = 1, max_memory: str = "4GB") -> dict:
    """{"kind", "build_s", "rows": one per selectivity, "modes": latency by search mode}.
    kind None: what the store chooses for `count` vectors under `max_memory`."""
    rng = np.random.default_rng(0)
    vectors, texts, asked = _clouds(count, dim, queries)
    rank = rng.permutation(count)  # "r" < m: m items scattered over ids and space
    tags = _tags(count, rng)
    records = [ItemRecord(i, "image", metadata={"r": int(rank[i]), "tags": tags[i]})
               for i in range(count)]
    records += [ItemRecord(count + i, "text", text=f"caption {i}") for i in range(len(texts))]
    started = time.perf_counter()
    write_generation(folder, ModelIdentity("ab" * 32, "synthetic", dim), records,
                     {"image": vectors, "text": texts},
                     StoreOptions(index_kind=kind, max_memory=max_memory))
    build_s = time.perf_counter() - started
    del records
    rows = []
    faiss.omp_set_num_threads(threads)  # for the searches (one query per call), not the build
    with open_generation(folder) as generation:
        searcher = Searcher(generation)
        chosen = generation.index_spec("image").kind
        copy = generation.manifest["modalities"]["image"].get("reduced")
        found, unfiltered_qps = _run(searcher, asked, None)
        truth = np.argsort(-(asked @ vectors.T), axis=1)[:, :K]
        unfiltered_recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)])
        for selectivity in SELECTIVITIES:
            matches = max(1, round(selectivity * count))
            subset = np.flatnonzero(rank < matches)
            truth = subset[np.argsort(-(asked @ vectors[subset].T), axis=1)[:, :K]]
            found, qps = _run(searcher, asked, {"field": "r", "lt": matches})
            recall = np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])
            rows.append({"kind": chosen, "count": count, "selectivity": selectivity,
                         "matches": matches, "recall_at_10": round(float(recall), 4),
                         "qps": round(qps, 1), "short_pages": sum(
                             len(f) < min(K, matches) for f in found),
                         "unfiltered_recall_at_10": round(float(unfiltered_recall), 4),
                         "unfiltered_qps": round(unfiltered_qps, 1)})
            print(json.dumps(rows[-1]), flush=True)
        modes = _modes(searcher, asked, rng)
    return {"kind": chosen, "count": count, "build_s": round(build_s, 1), "rows": rows,
            "modes": modes, "reduced": copy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kind", default=None, choices=("flat", "hnsw", "ivfpq"),
                        help="default: what the store chooses under --max-memory")
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--search-threads", type=int, default=1, help=(
        "FAISS threads while searching: one query per call gains nothing from more, and on "
        "busy cores OpenMP's spinning costs milliseconds a query"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(measure(args.count, args.dim, args.kind, args.queries, Path(folder),
                                 args.search_threads, args.max_memory)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
