"""Approximate nearest-neighbour indexes: choose a FAISS index by size and memory, build, search
(`retrieval.ann.tuning` sets their search knobs against exact search).

Every index is inner product over L2-normalised float32 vectors, wrapped in IndexIDMap2 so
FAISS returns the store's stable item ids (an on-disk index holds them in its lists).

The memory budget (`--max-memory`) counts what the index itself holds in RAM. IVF-PQ's
re-ranking reads the stored float32 vectors, which the store opens memory-mapped (its
`images.npy`): the OS pages in only the candidates' rows, so they fall under the page cache,
which the kernel can evict, not under the budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from retrieval.ann import ondisk
from retrieval.ann.rowscan import gather_rows, row_chunks, rows_of
from retrieval.errors import IndexStoreError

FLAT_MAX_COUNT = 20_000  # below this an exact scan is fast enough and needs no training
IVFPQ_MIN_COUNT = 1024  # PQ trains 256 centroids per sub-quantizer: fewer points cannot
HNSW_M = 32
# IVF-PQ codes are lossy: fetch this many times k candidates, then score them exactly with
# the stored float32 vectors. PQ ranking caps recall otherwise (0.82 at 200k x 512). The
# tuner picks the factor with nprobe; this is the untuned default.
RERANK_FACTOR = 8
RERANK_BLOCK = 64  # queries re-ranked at once: 64 x 160 candidates x 512 floats = 21 MB
IVF_PARALLEL_OVER_LISTS = 1  # faiss IndexIVF.parallel_mode (see apply_params)
KINDS = ("flat", "hnsw", "ivfpq", "ivfpq-disk")
DISK_KIND = "ivfpq-disk"  # inverted lists in a file beside the index (retrieval.ann.ondisk)
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
# IndexIDMap2 keeps each id twice: an int64 array and a reverse hash map (52 bytes a vector
# in all at 1,000,000, measured: 67 bytes a vector of RSS over IndexFlatIP's 4 floats)
ID_MAP_BYTES = 52
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
    return count * (4 * dim + ID_MAP_BYTES)


def hnsw_bytes(count: int, dim: int, m: int = HNSW_M) -> int:
    # level 0 keeps 2*M int32 links per vector; upper levels add about 1/M of that again
    return count * (4 * dim + int(2 * m * 4 * (1 + 1 / m)) + 8 + ID_MAP_BYTES)


def ivfpq_bytes(count: int, dim: int, pq_m: int, nlist: int) -> int:
    # a code and an int64 id in the lists, plus IndexIDMap2's maps
    return count * (pq_m + 8 + ID_MAP_BYTES) + nlist * dim * 4 + dim * dim * 4


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


def disk_training(count: int, spec: IndexSpec) -> ondisk.Training:
    """How many rows train an on-disk index: the sample of `training_size`; TRAIN_PER_LIST a
    list for the coarse centroids (more than the sample when the budget caps it: see
    `retrieval.ann.coarse`); OPQ's subsample sized to the budget too (`opq_training_size`)."""
    return ondisk.Training(training_size(count, spec),
                           min(count, TRAIN_PER_LIST * int(spec.params.get("nlist", 1))),
                           opq_training_size(spec), ondisk.OPQ_ITERATIONS)


def opq_training_size(spec: IndexSpec) -> int:
    """OPQ trains on its own subsample (faiss's default: 65,536 rows) and holds about seven
    copies of it (880 MB at 512 dimensions, measured), the largest peak of a build: a third of
    the budget's sample (`train_cap`), at least what 256 centroids a sub-quantizer need."""
    cap = int(spec.params.get("max_train", MAX_TRAIN))
    return int(min(ondisk.OPQ_MAX_TRAIN, max(MIN_TRAIN_POINTS, cap // 3)))


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
    code can be as large as recall wants (disk is cheap); refused when even those do not fit.
    The lists are not capped by the sample the budget allows: their centroids are trained by
    two-level k-means over more rows (`disk_training`, `retrieval.ann.coarse`)."""
    cap = train_cap(dim, budget)
    nlist, pq_m = ivf_nlist(count), ondisk.disk_pq_bytes(dim)
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
        rotation = faiss.downcast_VectorTransform(chain.at(0))
        rotation.niter = ondisk.OPQ_ITERATIONS
        rotation.max_train_points = opq_training_size(spec)
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
    """Set the query-time knobs (nprobe / efSearch) that `params` names.

    An IVF index searches its probed lists in parallel (faiss's parallel_mode 1) rather than
    its queries: the service mostly asks one query per call, which mode 0 runs on one core
    (at 300k vectors, nprobe 192: 3.1 ms -> 1.6 ms a query on 2 cores), while batches of
    queries lose about 3 %."""
    space = faiss.ParameterSpace()
    for name in ("nprobe", "efSearch"):
        if name in params:
            space.set_index_parameter(index, name, int(params[name]))
    if "nprobe" in params:
        faiss.extract_index_ivf(index).parallel_mode = IVF_PARALLEL_OVER_LISTS


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
