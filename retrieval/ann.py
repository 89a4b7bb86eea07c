"""Approximate nearest-neighbour indexes: choose a FAISS index by size and memory, build, tune.

Every index is inner product over L2-normalised float32 vectors, wrapped in IndexIDMap2 so
FAISS returns the store's stable item ids. Search parameters (nprobe, efSearch) are tuned with
queries from the *other* modality, because that is what the index will be asked at serving
time: captions look for images, images look for captions, and the two clouds sit apart.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from retrieval.errors import IndexStoreError

FLAT_MAX_COUNT = 20_000  # below this an exact scan is fast enough and needs no training
IVFPQ_MIN_COUNT = 1024  # PQ trains 256 centroids per sub-quantizer: fewer points cannot
HNSW_M = 32
OPQ_ITERATIONS = 10
MIN_TUNING_QUERIES = 50
TARGET_RECALL = 0.95
# IVF-PQ codes are lossy: fetch this many times k candidates, then score them exactly with
# the stored float32 vectors. PQ ranking caps recall otherwise (0.82 at 200k x 512).
RERANK_FACTOR = 8
KINDS = ("flat", "hnsw", "ivfpq")
# KB/MB/GB are decimal, KiB/MiB/GiB binary; a bare K/M/G/T is binary, as autofaiss reads
# its --max_index_memory_usage ("4G" = 4 * 2**30 bytes), so its budgets carry over unchanged.
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
MIN_PQ_BYTES = 8  # a shorter code keeps too little of a CLIP vector to rank by


@dataclass(frozen=True)
class IndexSpec:
    """What to build: a FAISS factory string plus the knobs the tuner may turn."""

    kind: str  # "flat", "hnsw" or "ivfpq"
    factory: str  # e.g. "IDMap2,OPQ32,IVF1024,PQ32"
    memory_bytes: int  # estimated resident size for `count` vectors
    params: dict[str, Any] = field(default_factory=dict)  # nlist, pq_m, opq, M, efSearch, nprobe

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_memory(text: str | int) -> int:
    """'4GB', '512MiB', autofaiss's '4G', '1e9' or an int -> bytes (see _UNITS)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 4GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def flat_bytes(count: int, dim: int) -> int:
    return count * (4 * dim + 8)  # vectors + the IDMap2 id arrays


def hnsw_bytes(count: int, dim: int, m: int = HNSW_M) -> int:
    # level 0 keeps 2*M int32 links per vector; upper levels add about 1/M of that again
    return count * (4 * dim + 8 + int(2 * m * 4 * (1 + 1 / m)) + 8)


def ivfpq_bytes(count: int, dim: int, pq_m: int, nlist: int) -> int:
    return count * (pq_m + 8 + 8) + nlist * dim * 4 + dim * dim * 4


def ivf_nlist(count: int) -> int:
    """About 4*sqrt(n) lists (a power of two), with >= 39 training points per list."""
    if count < 39 * 2:
        return 1
    target = 2 ** round(math.log2(max(4 * math.sqrt(count), 1)))
    return int(max(1, min(target, 2 ** int(math.log2(count // 39)), 65536)))


def choose_index(count: int, dim: int, max_memory: int | str = "4GB",
                 kind: str | None = None) -> IndexSpec:
    """Flat for small corpora, HNSW when its graph fits the budget, IVF-PQ otherwise.

    A pure function of (count, dim, budget) so the boundaries are testable; `kind` forces one
    (except IVF-PQ below IVFPQ_MIN_COUNT vectors, which cannot be trained: those stay flat).
    """
    budget = parse_memory(max_memory)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    kind = kind or _auto_kind(count, dim, budget)
    if kind == "ivfpq" and count < IVFPQ_MIN_COUNT:
        kind = "flat"
    if kind == "flat":
        return IndexSpec("flat", "IDMap2,Flat", flat_bytes(count, dim))
    if kind == "hnsw":
        return IndexSpec("hnsw", f"IDMap2,HNSW{HNSW_M},Flat", hnsw_bytes(count, dim),
                         {"M": HNSW_M, "efConstruction": 40, "efSearch": 64})
    return _ivfpq_spec(count, dim, budget)


def _auto_kind(count: int, dim: int, budget: int) -> str:
    if count < FLAT_MAX_COUNT and flat_bytes(count, dim) <= budget:
        return "flat"
    return "hnsw" if hnsw_bytes(count, dim) <= budget else "ivfpq"


def _ivfpq_spec(count: int, dim: int, budget: int) -> IndexSpec:
    """The largest PQ code (best recall) that fits; OPQ when each sub-vector is long."""
    nlist = ivf_nlist(count)
    divisors = [m for m in (64, 48, 32, 24, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim
                and m >= min(MIN_PQ_BYTES, dim)]
    pq_m = next((m for m in divisors if ivfpq_bytes(count, dim, m, nlist) <= budget), None)
    if pq_m is None:
        need = ivfpq_bytes(count, dim, divisors[-1], nlist)
        raise IndexStoreError(
            f"a memory budget of {budget:,} bytes is too small for {count:,} vectors of {dim} "
            f"dimensions: the smallest useful index (IVF-PQ with {divisors[-1]}-byte codes) "
            f"needs about {need / 2**20:,.0f} MiB; raise --max-memory")
    opq = dim // pq_m >= 8  # rotating helps when PQ must squeeze many dims into one byte
    prefix = f"OPQ{pq_m}," if opq else ""
    # "np": skip polysemous training, which only serves Hamming-filtered search
    return IndexSpec("ivfpq", f"IDMap2,{prefix}IVF{nlist},PQ{pq_m}np",
                     ivfpq_bytes(count, dim, pq_m, nlist),
                     {"nlist": nlist, "pq_m": pq_m, "opq": opq, "nprobe": min(16, nlist),
                      "rerank": RERANK_FACTOR})


def build_index(spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray,
                max_train: int = 100_000, seed: int = 0) -> faiss.Index:
    """Train (on a seeded sample) and fill an index with `vectors` (n, d) under `ids` (n,)."""
    dim = vectors.shape[1]
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efConstruction = spec.params["efConstruction"]
    if spec.params.get("opq"):
        # faiss's default 50 OPQ rounds cost minutes on a few cores for little recall
        chain = faiss.downcast_index(index.index).chain
        faiss.downcast_VectorTransform(chain.at(0)).niter = OPQ_ITERATIONS
    if not index.is_trained:
        sample = vectors
        if len(vectors) > max_train:
            rows = np.random.default_rng(seed).choice(len(vectors), max_train, replace=False)
            sample = vectors[np.sort(rows)]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    add(index, vectors, ids)
    apply_params(index, spec.params)
    return index


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, chunk: int = 65536) -> None:
    """Add in chunks so a memory-mapped (n, d) array is never copied whole."""
    for start in range(0, len(ids), chunk):
        part = np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32)
        index.add_with_ids(part, np.ascontiguousarray(ids[start:start + chunk], dtype=np.int64))


def apply_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set the query-time knobs (nprobe / efSearch) that `params` names."""
    space = faiss.ParameterSpace()
    for name in ("nprobe", "efSearch"):
        if name in params:
            space.set_index_parameter(index, name, int(params[name]))


def search_parameters(spec_kind: str, params: dict[str, Any],
                      selector: faiss.IDSelector | None) -> faiss.SearchParameters | None:
    """Per-call parameters carrying a tombstone filter; IndexIDMap2 translates the ids and
    IndexPreTransform (OPQ) passes the IVF parameters through."""
    if selector is None:
        return None
    if spec_kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=int(params["efSearch"]), sel=selector)
    if spec_kind == "ivfpq":
        return faiss.SearchParametersIVF(nprobe=int(params["nprobe"]), sel=selector)
    return faiss.SearchParameters(sel=selector)


VectorLookup = Callable[[np.ndarray], np.ndarray]  # (m,) ids -> (m, d) stored vectors


def search(index: faiss.Index, queries: np.ndarray, k: int, params: dict[str, Any],
           lookup: VectorLookup | None = None,
           search_params: faiss.SearchParameters | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) each (nq, k); with a `rerank` param and a lookup, the index proposes
    rerank * k candidates and exact inner products with the stored vectors rank them."""
    factor = int(params.get("rerank", 1))
    if factor <= 1 or lookup is None:
        return index.search(queries, k, params=search_params)
    _, candidates = index.search(queries, k * factor, params=search_params)  # (nq, k*f)
    valid = candidates >= 0
    vectors = lookup(np.where(valid, candidates, candidates.max(initial=0)).reshape(-1))
    vectors = vectors.reshape(*candidates.shape, -1)  # (nq, k*f, d)
    scores = np.einsum("qd,qcd->qc", queries, vectors)
    scores[~valid] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(candidates, top, axis=1)
    best = np.take_along_axis(scores, top, axis=1)
    ids[~np.isfinite(best)] = -1
    return np.where(np.isfinite(best), best, 0.0).astype(np.float32), ids


def sorted_lookup(ids: np.ndarray, vectors: np.ndarray) -> VectorLookup:
    """A lookup over vectors stored in ascending-id order (the store's .npy layout)."""
    return lambda wanted: np.asarray(vectors[np.searchsorted(ids, wanted).clip(0, len(ids) - 1)],
                                     dtype=np.float32)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(nq, k) row positions of the true top-k by inner product (the oracle)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true top-k ids found in the returned top-k, averaged over queries."""
    hits = sum(len(set(row[row >= 0]) & set(true)) for row, true in zip(found, truth))
    return hits / max(truth.size, 1)


def tune(index: faiss.Index, spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray,
         queries: np.ndarray, query_source: str, k: int = 10,
         target: float = TARGET_RECALL) -> tuple[IndexSpec, dict[str, Any]]:
    """Pick the cheapest nprobe / efSearch reaching `target` recall@k against exact search.

    `queries` (nq, d) come from the other modality. Returns the spec with the chosen value and
    a report (recall@k, queries/s, the curve); with too few queries tuning is skipped.
    """
    if len(queries) < MIN_TUNING_QUERIES or len(ids) == 0:
        return spec, {"skipped": f"{len(queries)} cross-modal queries "
                                 f"(< {MIN_TUNING_QUERIES}); {spec.kind} left at defaults",
                      "query_source": query_source}
    k = min(k, len(ids))
    truth = ids[exact_neighbours(vectors, queries, k)]  # (nq, k) stable ids
    name, values = _knob(spec)
    curve, chosen = [], None
    for value in values:
        params = {**spec.params, name: value} if name else dict(spec.params)
        recall, qps = _measure(index, params, queries, truth, k, sorted_lookup(ids, vectors))
        curve.append({name or "exact": value, "recall": round(recall, 4), "qps": round(qps, 1)})
        chosen = (value, recall, qps)
        if recall >= target:
            break
    value, recall, qps = chosen
    params = {**spec.params, name: value} if name else dict(spec.params)
    apply_params(index, params)
    tuned = IndexSpec(spec.kind, spec.factory, spec.memory_bytes, params)
    report = {"query_source": query_source, "queries": len(queries), "k": k,
              f"recall_at_{k}": round(recall, 4), "qps": round(qps, 1), "target": target,
              "param": name, "value": value, "curve": curve}
    return tuned, report


def _knob(spec: IndexSpec) -> tuple[str | None, list[int]]:
    if spec.kind == "ivfpq":
        return "nprobe", [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
                          if p <= spec.params["nlist"]]
    if spec.kind == "hnsw":
        return "efSearch", [16, 32, 64, 128, 256, 512]
    return None, [0]


def _measure(index: faiss.Index, params: dict[str, Any], queries: np.ndarray,
             truth: np.ndarray, k: int, lookup: VectorLookup) -> tuple[float, float]:
    apply_params(index, params)
    started = time.perf_counter()
    found = search(index, np.ascontiguousarray(queries, dtype=np.float32), k, params, lookup)[1]
    elapsed = max(time.perf_counter() - started, 1e-9)
    return recall_at(found, truth), len(queries) / elapsed
