"""Cross-modal recall@10 and queries/s of HNSW and IVF-PQ against exact (Flat) search.

    .venv/bin/python bench/ann.py --count 200000 --dim 512 --queries 1000

Synthetic CLIP-like data with a modality gap: images = normalise(c + g), captions =
normalise(c + noise - g), with one shared gap vector g; captions query the image index.
Building HNSW on 200k x 512 takes about 3 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from retrieval.ann import engines as ann
from retrieval.ann import rowscan, tuning


def gap_data(count: int, queries: int, dim: int, latent: int = 32,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Concepts live on a `latent`-dimensional subspace (real embeddings have low intrinsic
    dimension; i.i.d. 512-d Gaussians make every top-10 a near-tie), plus a little
    full-rank noise; the modality gap g is shared by all items of a modality."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    concepts = rng.standard_normal((count, latent), dtype=np.float32) @ basis  # (n, dim)
    concepts += 0.1 * rng.standard_normal((count, dim), dtype=np.float32)
    gap = rng.standard_normal(dim, dtype=np.float32)
    gap *= 0.5 * np.sqrt(dim) / np.linalg.norm(gap)  # about half a concept's length
    images = (concepts + gap).astype(np.float32)
    faiss.normalize_L2(images)
    picked = rng.choice(count, queries, replace=False)
    noise = 0.3 * rng.standard_normal((queries, dim), dtype=np.float32)
    captions = (concepts[picked] + noise - gap).astype(np.float32)
    faiss.normalize_L2(captions)
    return images, captions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", default="hnsw,ivfpq")
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--max-train", type=int, default=None,
                        help="IVF-PQ training sample (default: ann.training_size)")
    args = parser.parse_args()
    images, captions = gap_data(args.count, args.queries, args.dim)
    ids = np.arange(1, args.count + 1, dtype=np.int64)
    results = {"count": args.count, "dim": args.dim, "queries": args.queries,
               "threads": faiss.omp_get_max_threads(),
               "auto_choice": ann.choose_index(args.count, args.dim, args.max_memory).factory}
    started = time.perf_counter()
    rowscan.exact_neighbours(images, captions, 10)
    results["flat"] = {"recall_at_10": 1.0,
                       "qps": round(args.queries / (time.perf_counter() - started), 1)}
    print(json.dumps({"flat": results["flat"]}), flush=True)
    for kind in args.kinds.split(","):
        spec = ann.choose_index(args.count, args.dim, args.max_memory, kind=kind)
        started = time.perf_counter()
        index = ann.build_index(spec, images, ids, max_train=args.max_train)
        built = time.perf_counter() - started
        _, report = tuning.tune(index, spec, images, ids, captions, query_source="captions")
        results[kind] = {"factory": spec.factory, "build_s": round(built, 1),
                         "memory_estimate_mb": round(spec.memory_bytes / 1e6, 1), **report}
        print(json.dumps({kind: results[kind]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
