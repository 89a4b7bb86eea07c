"""Where filtered search should switch from an exact scan of the matching rows to the index
with an id selector, per index kind: ms per query (one query per call) of each path, at a
range of match counts, on seeded synthetic unit vectors written through the real store.

    python -m bench.filtered_crossover [--count 100000] [--dim 512] [--search-threads 1]

The numbers chose `retrieval.store.filtered.EXACT_BELOW`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from retrieval.models.identity import ModelIdentity
from retrieval.store import ItemRecord, StoreOptions, open_generation, write_generation
from retrieval.store.filtered import _indexed, exact_within

MATCHES = (500, 2_000, 5_000, 10_000, 20_000, 50_000)


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _ms_per_query(search, queries: np.ndarray) -> float:
    search(queries[:1])  # warm up
    started = time.perf_counter()
    for query in queries:
        search(query[None, :])
    return (time.perf_counter() - started) * 1000 / len(queries)


def measure(kind: str, count: int, dim: int, folder: Path, queries: int = 30,
            threads: int = 1) -> list[dict]:
    rng = np.random.default_rng(0)
    vectors = _unit(rng.normal(size=(count, dim)))
    records = [ItemRecord(i, "image") for i in range(count)]
    write_generation(folder / kind, ModelIdentity("ab" * 32, "synthetic", dim), records,
                     {"image": vectors}, StoreOptions(index_kind=kind, max_memory="16GB"))
    asked = _unit(rng.normal(size=(queries, dim)))
    rows = []
    faiss.omp_set_num_threads(threads)  # for the searches (one query per call), not the build
    with open_generation(folder / kind) as generation:
        stored = generation._stored("image")
        for matches in MATCHES:
            within = np.sort(rng.choice(count, matches, replace=False)).astype(np.int64)
            exact = _ms_per_query(lambda q, w=within: exact_within(stored, q, 10, w), asked)
            indexed = _ms_per_query(lambda q, w=within: _indexed(stored, q, 10, w), asked)
            rows.append({"kind": kind, "matches": matches, "exact_ms": round(exact, 3),
                         "indexed_ms": round(indexed, 3)})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kinds", nargs="+", default=["hnsw", "ivfpq"])
    parser.add_argument("--search-threads", type=int, default=1,
                        help="FAISS threads while searching (see bench.filtered)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds:
            measure(kind, args.count, args.dim, Path(folder), threads=args.search_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
