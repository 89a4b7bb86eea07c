"""Tuning an index's search knobs against exact search, on the queries it will be asked.

Search parameters (nprobe and the re-rank factor for IVF-PQ, efSearch for HNSW) are tuned with
queries from the *other* modality, because that is what the index will be asked at serving
time: captions look for images, images look for captions, and the two clouds sit apart. A
fifth of the queries are held out and the recall a generation reports is theirs.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

from retrieval.ann import ondisk
from retrieval.ann.engines import (
    DISK_KIND,
    IndexSpec,
    VectorLookup,
    apply_params,
    search,
    sorted_lookup,
)
from retrieval.ann.rowscan import exact_neighbours

MIN_TUNING_QUERIES = 50
TARGET_RECALL = 0.95
# Grids of about 1.5x steps: doubling alone overshoots (at 200k, nprobe 256 gave 0.9494 and
# the next step, 512, halved queries/s).
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768,
               1024, 1536, 2048, 3072, 4096)
EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
RERANK_GRID = (16, 8, 4, 2, 1)  # largest first (see _Probe.best)
HOLD_OUT_EVERY = 5  # one tuning query in five is held out to report recall honestly
QPS_TIE = 0.05  # batched queries/s this close are one speed (timing noise on a shared box)
PLATEAU = 0.003  # a wider search that gains less recall than this will not reach the target


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true top-k ids found in the returned top-k, averaged over queries."""
    hits = sum(len(set(row[row >= 0]) & set(true)) for row, true in zip(found, truth))
    return hits / max(truth.size, 1)


def split_queries(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tuning, held-out) queries: every HOLD_OUT_EVERY-th query is kept apart, so the recall
    a generation reports was measured on queries the tuner never saw."""
    held = np.zeros(len(queries), dtype=bool)
    held[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY] = True
    return queries[~held], queries[held]


def tune(index: faiss.Index, spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray,
         queries: np.ndarray, query_source: str, k: int = 10,
         target: float = TARGET_RECALL) -> tuple[IndexSpec, dict[str, Any]]:
    """Pick the fastest search parameters whose recall@k against exact search reaches `target`.

    `queries` (nq, d) come from the other modality; a fifth of them are held out and the
    report's `recall_at_k` is measured on those at the chosen parameters (`tuning_recall_at_k`
    on the rest). HNSW turns efSearch; IVF-PQ turns nprobe and the re-rank factor together.
    With too few queries tuning is skipped.
    """
    if len(queries) < MIN_TUNING_QUERIES or len(ids) == 0:
        return spec, {"skipped": f"{len(queries)} cross-modal queries "
                                 f"(< {MIN_TUNING_QUERIES}); {spec.kind} left at defaults",
                      "query_source": query_source}
    k = min(k, len(ids))
    tuning, held_out = split_queries(np.ascontiguousarray(queries, dtype=np.float32))
    lookup = sorted_lookup(ids, vectors)
    probe = _Probe(index, spec, tuning, ids[exact_neighbours(vectors, tuning, k)], k, lookup)
    params, recall, qps = probe.best(target)
    held_truth = ids[exact_neighbours(vectors, held_out, k)]
    held_recall, _ = _measure(index, params, held_out, held_truth, k, lookup)
    apply_params(index, params)
    name = probe.name
    report = {"query_source": query_source, "queries": len(queries), "k": k,
              f"recall_at_{k}": round(held_recall, 4), "held_out_queries": len(held_out),
              f"tuning_recall_at_{k}": round(recall, 4), "qps": round(qps, 1),
              "target": target, "param": name, "value": params.get(name) if name else 0,
              "rerank": int(params.get("rerank", 1)), "curve": probe.curve}
    return IndexSpec(spec.kind, spec.factory, spec.memory_bytes, params), report


Point = tuple[dict[str, Any], float, float]  # (search params, recall, queries/s)


class _Probe:
    """Measures parameter settings on the tuning queries and remembers the curve."""

    def __init__(self, index: faiss.Index, spec: IndexSpec, queries: np.ndarray,
                 truth: np.ndarray, k: int, lookup: VectorLookup):
        self.index, self.spec, self.queries, self.truth, self.k = index, spec, queries, truth, k
        self.lookup = lookup
        self.name, self.values = _knob(spec)
        self.curve: list[dict[str, Any]] = []
        self.points: list[Point] = []  # every setting measured, unrounded, in curve order

    def measure(self, value: int, rerank: int | None) -> Point:
        params = dict(self.spec.params)
        if self.name:
            params[self.name] = value
        if rerank is not None:
            params["rerank"] = rerank
        recall, qps = _measure(self.index, params, self.queries, self.truth, self.k, self.lookup)
        point = {self.name or "exact": value, "recall": round(recall, 4), "qps": round(qps, 1)}
        self.curve.append(point if rerank is None else {**point, "rerank": rerank})
        self.points.append((params, recall, qps))
        return params, recall, qps

    def best(self, target: float) -> Point:
        """The fastest setting reaching `target`, else the most accurate one measured.

        Re-rank factors are tried from the largest down; a smaller factor needs at least the
        nprobe a larger one needed, so each scan starts where the last one stopped and the
        whole grid costs about one pass over nprobe plus one point per factor."""
        factors = RERANK_GRID if self.spec.kind in ("ivfpq", DISK_KIND) else (None,)
        met: list[Point] = []
        start = 0
        for factor in factors:
            found = self._scan(factor, start, target)
            if found is None:  # even the widest useful search misses: smaller factors will too
                break
            start, point = found
            met.append(point)
        if met:
            return _shallowest_of_fastest(met)
        return max(self.points, key=lambda point: point[1])  # the most accurate, first of equals

    def _scan(self, factor: int | None, start: int, target: float
              ) -> tuple[int, Point] | None:
        """The first position from `start` whose setting reaches `target` with `factor`, and
        that point; None when the grid ran out or a step gained less than PLATEAU (then the
        codes cap recall, not the probes)."""
        last = -1.0
        for position in range(start, len(self.values)):
            point = self.measure(self.values[position], factor)
            if point[1] >= target:
                return position, point
            if point[1] - last < PLATEAU:
                return None
            last = point[1]
        return None


def _shallowest_of_fastest(met: list[Point]) -> Point:
    """The fastest point; points within QPS_TIE of it count as as fast, and the one of them
    with the smallest re-rank factor wins. The tuner's batched queries share their re-rank
    reads, which a served query makes alone: at 10M vectors on disk, rerank 8 and 4 measured
    80.4 and 80.1 queries/s batched, while each served query read 80 or 40 stored rows."""
    fastest = max(qps for _, _, qps in met)
    tied = [point for point in met if point[2] >= (1 - QPS_TIE) * fastest]
    return min(tied, key=lambda point: (int(point[0].get("rerank", 1)), -point[2]))


def _knob(spec: IndexSpec) -> tuple[str | None, list[int]]:
    if spec.kind in ("ivfpq", DISK_KIND):
        return "nprobe", [p for p in NPROBE_GRID if p <= spec.params["nlist"]]
    if spec.kind == "hnsw":
        return "efSearch", list(EF_SEARCH_GRID)
    return None, [0]


def _measure(index: faiss.Index, params: dict[str, Any], queries: np.ndarray,
             truth: np.ndarray, k: int, lookup: VectorLookup) -> tuple[float, float]:
    apply_params(index, params)
    started = time.perf_counter()
    found = search(index, np.ascontiguousarray(queries, dtype=np.float32), k, params, lookup)[1]
    elapsed = max(time.perf_counter() - started, 1e-9)
    ondisk.release_lists(index)  # a batch of probes maps most of a lists file larger than RAM
    return recall_at(found, truth), len(queries) / elapsed
