"""Approximate nearest-neighbour indexes: choose a FAISS index by size and memory, build, tune.

Every index is inner product over L2-normalised float32 vectors, wrapped in IndexIDMap2 so
FAISS returns the store's stable item ids. Search parameters (nprobe, efSearch) are tuned with
queries from the *other* modality, because that is what the index will be asked at serving
time: captions look for images, images look for captions, and the two clouds sit apart.

The memory budget (`--max-memory`) counts what the index itself holds in RAM. IVF-PQ's
re-ranking reads the stored float32 vectors, which the store opens memory-mapped (its
`images.npy`): the OS pages in only the candidates' rows, so they fall under the page cache,
which the kernel can evict, not under the budget.
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

from retrieval import ondisk
from retrieval.errors import IndexStoreError
from retrieval.rowscan import exact_neighbours, gather_rows, row_chunks, rows_of

FLAT_MAX_COUNT = 20_000  # below this an exact scan is fast enough and needs no training
IVFPQ_MIN_COUNT = 1024  # PQ trains 256 centroids per sub-quantizer: fewer points cannot
HNSW_M = 32
OPQ_ITERATIONS = 10
MIN_TUNING_QUERIES = 50
TARGET_RECALL = 0.95
# IVF-PQ codes are lossy: fetch this many times k candidates, then score them exactly with
# the stored float32 vectors. PQ ranking caps recall otherwise (0.82 at 200k x 512). The
# tuner picks the factor with nprobe; this is the untuned default.
RERANK_FACTOR = 8
RERANK_BLOCK = 64  # queries re-ranked at once: 64 x 160 candidates x 512 floats = 21 MB
# Grids of about 1.5x steps: doubling alone overshoots (at 200k, nprobe 256 gave 0.9494 and
# the next step, 512, halved queries/s).
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768,
               1024, 1536, 2048)
EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
RERANK_GRID = (16, 8, 4, 2, 1)  # largest first (see _Probe.best)
HOLD_OUT_EVERY = 5  # one tuning query in five is held out to report recall honestly
KINDS = ("flat", "hnsw", "ivfpq", "ivfpq-disk")
DISK_KIND = "ivfpq-disk"  # inverted lists in a file beside the index (retrieval.ondisk)
# KB/MB/GB are decimal, KiB/MiB/GiB binary; a bare K/M/G/T is binary, as autofaiss reads
# its --max_index_memory_usage ("4G" = 4 * 2**30 bytes), so its budgets carry over unchanged.
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
MIN_PQ_BYTES = 8  # a shorter code keeps too little of a CLIP vector to rank by
PQ_BYTES = (128, 96, 64, 48, 32, 24, 16, 8, 4, 2, 1)  # code sizes tried, largest first
TRAIN_PER_LIST = 64  # k-means points per inverted list (faiss wants 39 to 256)
MIN_TRAIN = 100_000  # PQ codebooks: 256 centroids per sub-quantizer want many points
MAX_TRAIN = 1 << 20  # the training sample's cap (2 GiB of float32 at 512 dimensions)
# Training holds several copies of its sample at once (the sample, its OPQ rotation, the IVF
# residuals PQ trains on, k-means' work: ~950 MB for a 200 MB sample of 512-d vectors,
# measured), so the sample gets a sixth of the memory budget, and the lists follow the sample.
TRAIN_SHARE = 6
MIN_TRAIN_POINTS = 10_000  # PQ's 256 centroids a sub-quantizer need 39 points each


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


def ivf_nlist(count: int, max_train: int = MAX_TRAIN) -> int:
    """About 4*sqrt(n) lists (a power of two), each with >= TRAIN_PER_LIST training points
    in the largest sample `training_size` takes (faiss warns below 39 a list)."""
    if count < 39 * 2:
        return 1
    target = 2 ** round(math.log2(max(4 * math.sqrt(count), 1)))
    most = min(count, MAX_TRAIN, max_train) // TRAIN_PER_LIST
    return int(max(1, min(target, 2 ** int(math.log2(max(most, 1))))))


def train_cap(dim: int, budget: int) -> int:
    """The most training vectors a memory budget allows (see TRAIN_SHARE), but never fewer
    than PQ needs (MIN_TRAIN_POINTS: a budget that small is exceeded while training)."""
    return max(MIN_TRAIN_POINTS, budget // (TRAIN_SHARE * dim * 4))


def training_size(count: int, spec: IndexSpec) -> int:
    """How many vectors train the coarse quantizer and codebooks: TRAIN_PER_LIST a list
    (k-means gains little past ~256 a list and costs time in proportion), at least enough
    for PQ's 256 centroids a sub-quantizer, at most MAX_TRAIN and what the budget allows
    (`max_train`, set by `choose_index`)."""
    lists = int(spec.params.get("nlist", 1))
    wanted = max(TRAIN_PER_LIST * lists, MIN_TRAIN)
    return min(count, wanted, max(MAX_TRAIN, MIN_TRAIN), spec.params.get("max_train", MAX_TRAIN))


def choose_index(count: int, dim: int, max_memory: int | str = "4GB",
                 kind: str | None = None) -> IndexSpec:
    """Flat for small corpora, HNSW when its graph fits the budget, IVF-PQ when its codes
    fit, IVF-PQ with its lists on disk when nothing held in RAM fits.

    A pure function of (count, dim, budget) so the boundaries are testable; `kind` forces one
    (except IVF-PQ below IVFPQ_MIN_COUNT vectors, which cannot be trained: those stay flat).
    """
    budget = parse_memory(max_memory)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    kind = kind or _auto_kind(count, dim, budget)
    if kind in ("ivfpq", DISK_KIND) and count < IVFPQ_MIN_COUNT:
        kind = "flat"
    if kind == "flat":
        return IndexSpec("flat", "IDMap2,Flat", flat_bytes(count, dim))
    if kind == "hnsw":
        return IndexSpec("hnsw", f"IDMap2,HNSW{HNSW_M},Flat", hnsw_bytes(count, dim),
                         {"M": HNSW_M, "efConstruction": 40, "efSearch": 64})
    if kind == DISK_KIND:
        return _disk_spec(count, dim, budget)
    return _ivfpq_spec(count, dim, budget)


def _disk_spec(count: int, dim: int, budget: int) -> IndexSpec:
    """IVF-PQ with its lists on disk: RAM holds the centroids and the rotation only, so the
    code can be as large as recall wants (disk is cheap); refused when even those do not fit."""
    cap = train_cap(dim, budget)
    nlist, pq_m = ivf_nlist(count, cap), ondisk.disk_pq_bytes(dim)
    opq = dim // pq_m >= 8
    resident = ondisk.resident_bytes(dim, nlist, opq)
    if resident > budget:
        raise IndexStoreError(
            f"a memory budget of {budget:,} bytes is too small for {count:,} vectors of {dim} "
            f"dimensions: even an index with its lists on disk keeps {nlist} centroids in RAM "
            f"(about {resident / 2**20:,.1f} MiB); raise --max-memory")
    prefix = f"OPQ{pq_m}," if opq else ""
    return IndexSpec(DISK_KIND, f"{prefix}IVF{nlist},PQ{pq_m}np", resident,
                     {"nlist": nlist, "pq_m": pq_m, "opq": opq, "nprobe": min(16, nlist),
                      "rerank": RERANK_FACTOR, "lists_bytes": ondisk.lists_bytes(count, pq_m),
                      "max_train": cap})


def _auto_kind(count: int, dim: int, budget: int) -> str:
    if count < FLAT_MAX_COUNT and flat_bytes(count, dim) <= budget:
        return "flat"
    return "hnsw" if hnsw_bytes(count, dim) <= budget else "ivfpq"


def _ivfpq_spec(count: int, dim: int, budget: int) -> IndexSpec:
    """The largest PQ code (best recall) that fits the budget, up to 128 bytes; OPQ when each
    sub-vector is long."""
    cap = train_cap(dim, budget)
    nlist = ivf_nlist(count, cap)
    divisors = [m for m in PQ_BYTES if dim % m == 0 and m <= dim
                and m >= min(MIN_PQ_BYTES, dim)]
    pq_m = next((m for m in divisors if ivfpq_bytes(count, dim, m, nlist) <= budget), None)
    if pq_m is None:  # no useful code fits in RAM: keep the codes on disk instead
        return _disk_spec(count, dim, budget)
    opq = dim // pq_m >= 8  # rotating helps when PQ must squeeze many dims into one byte
    prefix = f"OPQ{pq_m}," if opq else ""
    # "np": skip polysemous training, which only serves Hamming-filtered search
    return IndexSpec("ivfpq", f"IDMap2,{prefix}IVF{nlist},PQ{pq_m}np",
                     ivfpq_bytes(count, dim, pq_m, nlist),
                     {"nlist": nlist, "pq_m": pq_m, "opq": opq, "nprobe": min(16, nlist),
                      "rerank": RERANK_FACTOR, "max_train": cap})


def build_index(spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray,
                max_train: int | None = None, seed: int = 0) -> faiss.Index:
    """Train (on a seeded sample, `training_size` unless `max_train` says) and fill an index
    with `vectors` (n, d) under `ids` (n,)."""
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
        max_train = training_size(len(vectors), spec) if max_train is None else max_train
        if len(vectors) > max_train:
            rows = np.random.default_rng(seed).choice(len(vectors), max_train, replace=False)
            sample = gather_rows(vectors, np.sort(rows))
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    add(index, vectors, ids)
    apply_params(index, spec.params)
    return index


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, chunk: int = 65536) -> None:
    """Add in chunks so a memory-mapped (n, d) array is never loaded whole."""
    for start, part in row_chunks(vectors, chunk):
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
    if spec_kind in ("ivfpq", DISK_KIND):
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
    scores = np.empty(candidates.shape, np.float32)
    for start in range(0, len(queries), RERANK_BLOCK):  # bounds the gathered vectors
        part = slice(start, start + RERANK_BLOCK)
        wanted = np.where(valid[part], candidates[part], candidates.max(initial=0))
        vectors = lookup(wanted.reshape(-1)).reshape(*wanted.shape, -1)  # (b, k*f, d)
        scores[part] = np.einsum("qd,qcd->qc", queries[part], vectors)
    scores[~valid] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(candidates, top, axis=1)
    best = np.take_along_axis(scores, top, axis=1)
    ids[~np.isfinite(best)] = -1
    return np.where(np.isfinite(best), best, 0.0).astype(np.float32), ids


def sorted_lookup(ids: np.ndarray, vectors: np.ndarray) -> VectorLookup:
    """A lookup over vectors stored in ascending-id order (the store's .npy layout). Rows of
    memory-mapped vectors are gathered a chunk of the file at a time: re-ranking a batch of
    tuning queries touches rows all over it, which would otherwise make a whole corpus
    larger than RAM resident in the process."""
    def lookup(wanted: np.ndarray) -> np.ndarray:
        return gather_rows(vectors, rows_of(ids, wanted))
    return lookup


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


class _Probe:
    """Measures parameter settings on the tuning queries and remembers the curve."""

    def __init__(self, index: faiss.Index, spec: IndexSpec, queries: np.ndarray,
                 truth: np.ndarray, k: int, lookup: VectorLookup):
        self.index, self.spec, self.queries, self.truth, self.k = index, spec, queries, truth, k
        self.lookup = lookup
        self.name, self.values = _knob(spec)
        self.curve: list[dict[str, Any]] = []

    def measure(self, value: int, rerank: int | None) -> tuple[dict[str, Any], float, float]:
        params = dict(self.spec.params)
        if self.name:
            params[self.name] = value
        if rerank is not None:
            params["rerank"] = rerank
        recall, qps = _measure(self.index, params, self.queries, self.truth, self.k, self.lookup)
        point = {self.name or "exact": value, "recall": round(recall, 4), "qps": round(qps, 1)}
        self.curve.append(point if rerank is None else {**point, "rerank": rerank})
        return params, recall, qps

    def best(self, target: float) -> tuple[dict[str, Any], float, float]:
        """The fastest setting reaching `target`, else the most accurate one measured.

        Re-rank factors are tried from the largest down; a smaller factor needs at least the
        nprobe a larger one needed, so each scan starts where the last one stopped and the
        whole grid costs about one pass over nprobe plus one point per factor."""
        factors = RERANK_GRID if self.spec.kind in ("ivfpq", DISK_KIND) else (None,)
        met: list[tuple[dict[str, Any], float, float]] = []
        fallback, start = None, 0
        for factor in factors:
            for position in range(start, len(self.values)):
                measured = self.measure(self.values[position], factor)
                if fallback is None or measured[1] > fallback[1]:
                    fallback = measured
                if measured[1] >= target:
                    met.append(measured)
                    start = position
                    break
            else:
                break  # even the widest search misses: smaller factors will too
        chosen = max(met, key=lambda m: m[2]) if met else fallback
        assert chosen is not None  # the grids are never empty
        return chosen


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
    return recall_at(found, truth), len(queries) / elapsed
