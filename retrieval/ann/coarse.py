"""Coarse centroids for an IVF index with more lists than its training sample can feed.

k-means wants 40 to 256 points a list (faiss warns below 39), so the 16,384 lists that suit
10,000,000 vectors want about a million training points: 2 GiB of float32 at 512 dimensions,
where a 2 GB budget leaves room for a sample of about 160,000 (`ann.train_cap`). Capping the
lists at what that sample feeds (2,048) makes every query scan far more codes for the same
recall. Two-level k-means (the scheme of faiss.contrib.clustering.two_level_clustering, which
holds all of its points in RAM) trains them all within the budget:

1. k-means of about sqrt(nlist) clusters on the sample already in memory;
2. the training rows, spread over the corpus, read a chunk at a time, mapped the way the index
   maps vectors before its lists (OPQ's rotation), assigned to a first-level cluster and
   spilled to a scratch file;
3. each first-level cluster's rows read back alone and split by k-means into its share of
   the lists (in proportion to its size).

Memory: the sample plus one cluster's rows (about sqrt(nlist) * 64 rows, 8 MiB at 16,384
lists); the scratch file holds the training rows once and is deleted before returning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from retrieval.ann.rowscan import RowWriter, gather_rows, release

ITERATIONS = 10  # k-means rounds at both levels (faiss's default 25 buys little here)
SPILL_ROWS = 1 << 14  # rows read, mapped and spilled at a time (32 MiB at 512 dimensions)
Transform = Callable[[np.ndarray], np.ndarray]  # (n, d) -> (n, d'): what precedes the lists


def centroids(vectors: np.ndarray, rows: np.ndarray, nlist: int, sample: np.ndarray,
              transform: Transform, scratch: Path, seed: int = 0) -> np.ndarray:
    """(nlist, d') spherical k-means centroids of transform(vectors[rows]) (`rows` ascending,
    `vectors` possibly memory-mapped); `sample` (m, d') is already transformed."""
    first = kmeans(sample, min(max(1, round(math.sqrt(nlist))), len(sample)), seed)
    labels = np.empty(len(rows), np.int64)
    assign = faiss.IndexFlatIP(first.shape[1])
    assign.add(first)
    with RowWriter(scratch, first.shape[1], len(rows)) as spill:
        for start in range(0, len(rows), SPILL_ROWS):
            part = np.ascontiguousarray(transform(gather_rows(vectors,
                                                              rows[start:start + SPILL_ROWS])))
            labels[start:start + len(part)] = assign.search(part, 1)[1][:, 0]
            spill.write(part)
    try:
        spilled = np.load(scratch, mmap_mode="r")
        found = []
        for cluster, share in enumerate(shares(np.bincount(labels, minlength=len(first)), nlist)):
            if share:
                members = gather_rows(spilled, np.flatnonzero(labels == cluster))
                found.append(kmeans(members, int(share), seed))
        release(spilled)
        del spilled
    finally:
        scratch.unlink(missing_ok=True)
    return np.vstack(found)


def shares(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split `total` lists among clusters in proportion to their `sizes` (sums to `total`)."""
    bounds = np.cumsum(sizes) * total // max(int(sizes.sum()), 1)
    return np.diff(bounds, prepend=0)


def kmeans(points: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(k, d) spherical k-means centroids of `points`, as IVF over inner products trains its
    coarse quantizer; with no more points than k, the points themselves, repeated to k rows
    (a repeated centroid's list stays empty)."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    if k >= len(points):
        return np.resize(points, (k, points.shape[1]))
    model = faiss.Kmeans(points.shape[1], k, niter=ITERATIONS, seed=seed, spherical=True,
                         max_points_per_centroid=256, min_points_per_centroid=1)
    model.train(points)
    return model.centroids
