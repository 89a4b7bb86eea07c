"""Filtered search through the whole Searcher (SQLite for the matches, then exact or FAISS
with an id selector): recall@10 against exact search over the filtered subset, queries/s one
query per call, and short pages (fewer than min(10, matches) hits), at selectivities from
50 % to 0.01 %, beside unfiltered search (recall and queries/s) on the same index.

The data are CLIP-like clouds: images around 2,000 concepts, and noisy "captions" of some of
them stored as texts, so the index is tuned as a real one is (cross-modal queries to 0.95
recall); the queries are other noisy captions.

    python -m bench.filtered [--count 100000] [--dim 512] [--kind hnsw] [--queries 200]
                             [--search-threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from retrieval.query import Query
from retrieval.search import Searcher
from retrieval.store import (
    ItemRecord,
    ModelIdentity,
    StoreOptions,
    open_generation,
    write_generation,
)

SELECTIVITIES = (0.5, 0.05, 0.005, 0.0001)
K = 10


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _run(searcher: Searcher, queries: np.ndarray, where: dict | None) -> tuple[list, float]:
    searcher.search(Query.vector(queries[0].tolist(), k=K, filter=where))  # warm the caches
    started = time.perf_counter()
    found = [[hit.id for hit in searcher.search(Query.vector(q.tolist(), k=K,
                                                             filter=where)).hits]
             for q in queries]
    return found, len(queries) / (time.perf_counter() - started)


def _clouds(count: int, dim: int, queries: int, rng: np.random.Generator):
    concepts = rng.normal(size=(2000, dim))
    images = _unit(concepts[rng.integers(0, 2000, count)] + rng.normal(size=(count, dim)))

    def captions(n: int) -> np.ndarray:
        return _unit(images[rng.integers(0, count, n)] + 0.6 * rng.normal(size=(n, dim)))
    return images, captions(1000), captions(queries)


def measure(count: int, dim: int, kind: str, queries: int, folder: Path,
            threads: int = 1) -> list[dict]:
    rng = np.random.default_rng(0)
    vectors, texts, asked = _clouds(count, dim, queries, rng)
    rank = rng.permutation(count)  # "r" < m: m items scattered over ids and space
    records = [ItemRecord(i, "image", metadata={"r": int(rank[i])}) for i in range(count)]
    records += [ItemRecord(count + i, "text", text=f"caption {i}") for i in range(len(texts))]
    write_generation(folder, ModelIdentity("ab" * 32, "synthetic", dim), records,
                     {"image": vectors, "text": texts},
                     StoreOptions(index_kind=kind, max_memory="16GB"))
    rows = []
    faiss.omp_set_num_threads(threads)  # for the searches (one query per call), not the build
    with open_generation(folder) as generation:
        searcher = Searcher(generation)
        found, unfiltered_qps = _run(searcher, asked, None)
        truth = np.argsort(-(asked @ vectors.T), axis=1)[:, :K]
        unfiltered_recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)])
        for selectivity in SELECTIVITIES:
            matches = max(1, round(selectivity * count))
            subset = np.flatnonzero(rank < matches)
            truth = subset[np.argsort(-(asked @ vectors[subset].T), axis=1)[:, :K]]
            found, qps = _run(searcher, asked, {"field": "r", "lt": matches})
            recall = np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])
            rows.append({"kind": kind, "count": count, "selectivity": selectivity,
                         "matches": matches, "recall_at_10": round(float(recall), 4),
                         "qps": round(qps, 1), "short_pages": sum(
                             len(f) < min(K, matches) for f in found),
                         "unfiltered_recall_at_10": round(float(unfiltered_recall), 4),
                         "unfiltered_qps": round(unfiltered_qps, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kind", default="hnsw", choices=("flat", "hnsw", "ivfpq"))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--search-threads", type=int, default=1, help=(
        "FAISS threads while searching: one query per call gains nothing from more, and on "
        "busy cores OpenMP's spinning costs milliseconds a query"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        measure(args.count, args.dim, args.kind, args.queries, Path(folder),
                args.search_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
