"""Two-level k-means: the coarse centroids of an IVF index trained over more rows than fit in
memory at once, from a memory-mapped file, as well as one k-means over all of them would."""

from __future__ import annotations

import faiss
import numpy as np

from retrieval.ann import coarse
from retrieval.ann.rowscan import RowWriter


def blobs(count: int, centres: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim)).astype(np.float32)
    points = middle[rng.integers(0, centres, count)] + 0.15 * rng.normal(size=(count, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def mean_best_score(points: np.ndarray, centroids: np.ndarray) -> float:
    index = faiss.IndexFlatIP(points.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return float(index.search(points, 1)[0].mean())


def test_two_levels_over_a_mapped_file_fit_as_well_as_one_kmeans_over_everything(tmp_path):
    points = blobs(6000, centres=40)
    with RowWriter(tmp_path / "rows.npy", points.shape[1], len(points)) as out:
        out.write(points)
    mapped = np.load(tmp_path / "rows.npy", mmap_mode="r")
    sample = points[::10]  # what the budget leaves in memory: a tenth of the rows
    rows = np.arange(0, len(points), 2)  # the coarse training rows, read a chunk at a time
    scratch = tmp_path / "spill.npy"
    found = coarse.centroids(mapped, rows, 64, sample, np.asarray, scratch)
    assert found.shape == (64, points.shape[1]) and not scratch.exists()
    one_level = coarse.kmeans(points, 64)
    assert mean_best_score(points, found) >= 0.98 * mean_best_score(points, one_level)


def test_a_transform_is_applied_before_clustering(tmp_path):
    points = blobs(2000, centres=8)
    flip = -np.eye(points.shape[1], dtype=np.float32)
    found = coarse.centroids(points, np.arange(len(points)), 16, points[::4] @ flip,
                             lambda rows: rows @ flip, tmp_path / "spill.npy")
    assert mean_best_score(points @ flip, found) > 0.9 > mean_best_score(points, found)


def test_lists_are_shared_in_proportion_and_sum_to_the_total():
    assert coarse.shares(np.array([100, 0, 50, 1, 849]), 16).tolist() == [1, 0, 1, 0, 14]
    assert coarse.shares(np.array([3, 3, 3]), 9).sum() == 9
    few = coarse.kmeans(np.eye(4, dtype=np.float32), 6)  # fewer points than lists
    assert few.shape == (6, 4)
