"""A reduced copy of a modality's vectors (its principal components), which filtered searches
of middling selectivity scan before re-ranking the best candidates with the full vectors.

Between the few matches an exact scan handles and the many for which the FAISS index with an
id selector is fast, HNSW is slow: its graph walk passes through the items the filter drops,
so at 5 % of 1,000,000 vectors it needed 2.7x the unfiltered efSearch (and time) to reach the
unfiltered recall, and an exact scan of the 50,000 matches' full vectors (100 MB gathered per
query) was slower still. Scoring the matches' first principal components instead reads an
eighth of that, contiguous in RAM, and the `rerank` best of them are scored exactly, so the
order of the hits is exact and only a true neighbour ranked below `rerank` by the reduced
scores can be missed.

The number of components and `rerank` are chosen when the generation is written, on its own
vectors: the fewest components, then the smallest `rerank`, whose candidates hold the exact
top-k of the tuning queries (cross-modal, as `tuning.tune`'s) over the whole modality at the
store's recall target. The whole modality is the hard case: a filter leaves fewer
competitors near each query, so a subset's true neighbours rank higher among its reduced
scores than the whole set's do. When no setting reaches the target (vectors whose variance
is spread over every dimension), no copy is written and filtered searches use the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.ann.rowscan import exact_neighbours, gather_rows, row_chunks
from retrieval.ann.tuning import TARGET_RECALL, split_queries

KINDS = ("hnsw",)  # IVF indexes search a filter's matches list by list already
DIMS = (32, 64, 128)  # components tried, fewest first; only those under half the dimension
RERANK_GRID = (50, 100, 200, 400, 800)
SAMPLE_ROWS = 100_000  # rows the components are fitted on
TUNING_QUERIES = 250  # a fifth held out to report recall, as tuning.tune does
MIN_ROWS = 20_000  # below this an exact scan of any filter's matches is cheap enough
MIN_QUERIES = 50  # cross-modal queries needed to tune on them rather than on own rows


@dataclass(frozen=True)
class Reduced:
    """mean (d,), components (c, d) and the rows' reduced vectors (n, c), row-aligned with
    the stored vectors; `rerank` candidates are re-scored exactly."""

    mean: np.ndarray
    components: np.ndarray
    rows: np.ndarray
    rerank: int

    def search(self, vectors: np.ndarray, queries: np.ndarray, k: int,
               rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nq, d) unit queries -> (scores, positions) each (nq, k), best first, among the
        stored rows `rows` (ascending positions): reduced scores pick each query's `rerank`
        candidates, their full vectors order them exactly."""
        # q . x = q . mean + q . (x - mean), and the first term is the same for every row
        reduced = np.take(self.rows, rows, axis=0) @ (queries @ self.components.T).T  # (m, nq)
        depth = min(max(self.rerank, k), len(rows))
        best_scores = np.empty((len(queries), k), np.float32)
        best_rows = np.empty((len(queries), k), np.int64)
        for q in range(len(queries)):
            picked = np.argpartition(-reduced[:, q], depth - 1)[:depth] if depth < len(
                rows) else np.arange(len(rows))
            candidates = np.sort(rows[picked])
            # a few hundred rows: read them directly (a chunked gather's page release costs
            # more than the rows, and they are an HNSW index's, which holds them all anyway)
            exact = vectors[candidates] @ queries[q]
            order = np.lexsort((candidates, -exact))[:k]
            best_scores[q], best_rows[q] = exact[order], candidates[order]
        return best_scores, best_rows


def build(vectors: np.ndarray, live: np.ndarray, queries: np.ndarray, kind: str,
          files: tuple[Path, Path], spare: float = np.inf, k: int = 10,
          target: float = TARGET_RECALL) -> dict[str, Any] | None:
    """Fit, tune and write the reduced copy of `vectors` (n, d) (`live`: ascending row
    positions of the live items) to `files` (components .npz, rows .npy); its manifest
    section, or None when the index kind needs none, the modality is small, no copy fits in
    `spare` bytes (what the memory budget leaves beside the index), or no setting reaches
    `target`."""
    dims = [c for c in DIMS if c <= vectors.shape[1] // 2 and 4 * c * len(vectors) <= spare]
    if kind not in KINDS or len(live) < MIN_ROWS or not dims:
        return None
    rng = np.random.default_rng(0)
    sample = gather_rows(vectors, np.sort(rng.choice(live, min(SAMPLE_ROWS, len(live)),
                                                     replace=False)))
    mean = sample.mean(axis=0)
    _, basis = np.linalg.eigh(np.cov(sample - mean, rowvar=False))  # ascending variance
    components = np.ascontiguousarray(basis[:, ::-1][:, :dims[-1]].T, dtype=np.float32)
    live_rows = _Subset(vectors, live)
    asked, own = _queries(live_rows, queries, rng)
    tuned, held_out = split_queries(asked)
    truth = [_truth(live_rows, part, k, mine)
             for part, mine in zip((tuned, held_out), split_queries(own))]
    for count in dims:
        reduced = _project(vectors, mean, components[:count])
        scanned = reduced[live] if len(live) < len(reduced) else reduced
        ranks = [_ranks(scanned, components[:count], part, known)
                 for part, known in zip((tuned, held_out), truth)]
        rerank = next((r for r in RERANK_GRID if (ranks[0] < r).mean() >= target), None)
        if rerank is not None:
            np.savez(files[0], mean=mean.astype(np.float32), components=components[:count])
            np.save(files[1], reduced)
            return {"components": count, "rerank": rerank,
                    f"recall_at_{k}": round(float((ranks[1] < rerank).mean()), 4),
                    f"tuning_recall_at_{k}": round(float((ranks[0] < rerank).mean()), 4),
                    "held_out_queries": len(held_out), "target": target,
                    "query_source": "cross-modal" if own[0] < 0 else "own rows"}
    return None


def load(files: tuple[Path, Path], section: dict[str, Any] | None) -> Reduced | None:
    """The reduced copy a manifest section describes (read into RAM: an eighth or less of
    the vectors an HNSW index holds anyway), or None when the generation has none. A file
    that cannot be read raises OSError or ValueError; the store reports it as corrupt."""
    if not section:
        return None
    with np.load(files[0], allow_pickle=False) as parts:
        if not {"mean", "components"} <= set(parts.files):
            raise ValueError(f"{files[0].name} holds {parts.files}, not mean and components")
        mean, components = parts["mean"], parts["components"]
    rows = np.load(files[1], allow_pickle=False)
    if rows.shape[1:] != (len(components),) or components.shape[1:] != mean.shape:
        raise ValueError(f"shape {rows.shape} does not fit components {components.shape}")
    return Reduced(mean, components, rows, int(section["rerank"]))


class _Subset:
    """Some rows of a (maybe memory-mapped) matrix, sliced like a matrix of their own (what
    `exact_neighbours` streams over)."""

    def __init__(self, vectors: np.ndarray, rows: np.ndarray):
        self.vectors, self.rows = vectors, rows
        self.shape = (len(rows), vectors.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, where: slice | np.ndarray) -> np.ndarray:
        return gather_rows(self.vectors, self.rows[where])


def _queries(rows: _Subset, queries: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """(TUNING_QUERIES or fewer queries, (n,) live position each one is, -1 for none): the
    other modality's vectors when there are enough (the searches users make), else a sample
    of the modality's own rows (a photo library with no captions), each one's own row then
    left out of its neighbours."""
    if len(queries) >= MIN_QUERIES:
        picked = np.sort(rng.choice(len(queries), min(TUNING_QUERIES, len(queries)),
                                    replace=False))
        return (np.ascontiguousarray(queries[picked], dtype=np.float32),
                np.full(len(picked), -1, np.int64))
    own = np.sort(rng.choice(len(rows), TUNING_QUERIES, replace=False))
    return rows[own], own


def _truth(rows: _Subset, queries: np.ndarray, k: int, own: np.ndarray) -> np.ndarray:
    """(nq, k) live positions of each query's exact top-k, its own row left out."""
    found = exact_neighbours(rows, queries, k + 1)
    return np.array([[p for p in row if p != mine][:k] for row, mine in zip(found, own)])


def _project(vectors: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """(n, c) reduced vectors of every row, a chunk at a time."""
    out = np.empty((len(vectors), len(components)), np.float32)
    for start, part in row_chunks(vectors):
        out[start:start + len(part)] = (part - mean) @ components.T
    return out


def _ranks(reduced: np.ndarray, components: np.ndarray, queries: np.ndarray,
           truth: np.ndarray, block: int = 16) -> np.ndarray:
    """(nq, k) where each exact neighbour (`truth`, positions in `reduced`) ranks among its
    query's reduced scores, RERANK_GRID[-1] for any ranked beyond the deepest re-rank. With
    `rerank` candidates the exact re-rank then puts each neighbour ranked below it in place."""
    deepest = RERANK_GRID[-1]
    ranks = np.full(truth.shape, deepest, np.int64)
    if deepest >= len(reduced):
        return np.zeros(truth.shape, np.int64)
    for start in range(0, len(queries), block):  # (block, n) scores at a time
        scores = (queries[start:start + block] @ components.T) @ reduced.T
        best = np.argpartition(-scores, deepest - 1, axis=1)[:, :deepest]
        for row, (picked, wanted) in enumerate(zip(best, truth[start:start + block])):
            ordered = picked[np.argsort(-scores[row, picked], kind="stable")]
            where = {int(p): rank for rank, p in enumerate(ordered)}
            ranks[start + row] = [where.get(int(w), deepest) for w in wanted]
    return ranks


