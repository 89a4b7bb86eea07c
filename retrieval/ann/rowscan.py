"""Scans over (n, d) row matrices that may be memory-mapped files larger than RAM: chunks,
gathered rows, the exact top-k (the oracle every approximate index is measured against), and
the one writer of such files (`RowWriter`).

Reading a memory-mapped .npy a slice at a time does not bound a process's memory by itself:
every page read stays mapped into the process and counts in its resident set until the map
is closed, so one pass over 20 GB of vectors shows 20 GB of RSS (and an OOM killer or a
container limit acts on that figure). Each chunk's pages are therefore handed back
(`madvise(MADV_DONTNEED)`) once the chunk has been copied out; they stay in the page cache,
where the kernel may reclaim them, and a later read maps them again. For an ordinary array
the functions are plain slicing.

Gathering scattered rows has the opposite problem: a fault on a page that is not in the page
cache reads it together with the device's readahead window, one fault after another (8 MiB a
fault on the VM these figures come from: `/sys/block/*/queue/read_ahead_kb`). Re-ranking 40
candidates spread over a 20 GB file would read gigabytes, in series. `prefetch` asks for just
the rows' pages, all at once, before they are touched.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
from typing_extensions import Self

CHUNK_ROWS = 1 << 16  # 128 MiB of float32 at 512 dimensions
RELEASE_MARGIN = 4 << 20
PREFETCH_GAP = 1 << 16  # rows closer than this many bytes are read as one range
PREFETCH_RANGES = 1024  # a gather of more ranges is dense: the kernel's readahead serves it


def row_chunks(rows: np.ndarray, size: int = CHUNK_ROWS, dtype: type = np.float32
               ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, contiguous copy of rows[start:start + size]) for consecutive chunks; a
    memory-mapped chunk's pages are released before the next is read."""
    for start in range(0, len(rows), size):
        view = rows[start:start + size]
        chunk = np.array(view, dtype=dtype, order="C", copy=True)
        release(view)
        yield start, chunk


def gather_rows(rows: np.ndarray, positions: np.ndarray, size: int = CHUNK_ROWS,
                dtype: type = np.float32) -> np.ndarray:
    """rows[positions] (any order, repeats allowed), read one chunk of the matrix at a time,
    each chunk's pages handed back before the next: rows spread over a whole mapped file (a
    training sample, the candidates of a batch of re-ranked queries) would otherwise make all
    of it resident at once."""
    positions = np.asarray(positions, dtype=np.int64)
    prefetch(rows, positions)
    order = np.argsort(positions, kind="stable")
    ordered = positions[order]
    out = np.empty((len(positions), rows.shape[1]), dtype=dtype)
    bounds = np.flatnonzero(np.diff(ordered // size)) + 1
    for part in np.split(np.arange(len(ordered)), bounds):
        if len(part) == 0:
            continue
        start = int(ordered[part[0]] // size) * size
        view = rows[start:start + size]
        out[order[part]] = view[ordered[part] - start]
        release(view)
    return out


def prefetch(rows: np.ndarray, positions: np.ndarray) -> None:
    """Start reading the pages under rows[positions] of a memory-mapped matrix, in parallel
    (madvise(MADV_WILLNEED) on each range of nearby rows; the faults that follow find the
    pages cached and read nothing more). Nothing for an ordinary array, or when the rows make
    more than PREFETCH_RANGES ranges (a syscall each would cost more than readahead loses).
    Measured on 1M x 512 re-ranked IVF-PQ queries from a cold page cache, one at a time:
    85 -> 208 queries/s, and 23 MB read instead of the whole 1.9 GB file."""
    handle = _mapping(rows)
    if (handle is None or handle.closed or len(positions) == 0 or rows.ndim != 2
            or rows.strides[1] != rows.itemsize):
        return
    stride = rows.strides[0]
    starts = _offset(rows, handle) + np.unique(positions) * stride
    breaks = np.flatnonzero(np.diff(starts) > stride + PREFETCH_GAP) + 1
    if len(breaks) >= PREFETCH_RANGES:
        return
    for first, last in zip(starts[np.r_[0, breaks]], starts[np.r_[breaks - 1, len(starts) - 1]]):
        first, end = int(first), min(int(last) + rows.shape[1] * rows.itemsize, len(handle))
        aligned = first - first % mmap.PAGESIZE
        handle.madvise(mmap.MADV_WILLNEED, aligned, end - aligned)


def rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The rows of `wanted` ids (any shape) among stored ascending `ids`, clipped into range:
    a caller that may ask for an absent id checks ids[rows] == wanted. A modality's ids are
    usually one unbroken run (deletes keep their rows), and then a row is an offset: a binary
    search of 50,000 ids among 1,000,000 costs 2.5 ms, more than a filtered scan it feeds."""
    if len(ids) and int(ids[-1]) - int(ids[0]) == len(ids) - 1:
        rows = np.asarray(wanted, dtype=np.int64) - int(ids[0])
    else:
        rows = np.searchsorted(ids, wanted)
    return rows.clip(0, max(len(ids) - 1, 0))


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int,
                     chunk: int = CHUNK_ROWS) -> np.ndarray:
    """(nq, k) row positions of the true top-k by inner product (the oracle), streaming over
    `vectors` a chunk at a time so a memory-mapped corpus is never loaded whole."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best = np.full((len(queries), 0), -np.inf, np.float32)
    rows = np.zeros((len(queries), 0), np.int64)
    for start, part in row_chunks(vectors, chunk):
        flat = faiss.IndexFlatIP(part.shape[1])
        flat.add(part)
        scores, found = flat.search(queries, min(k, len(part)))
        best = np.concatenate([best, scores], axis=1)
        rows = np.concatenate([rows, found + start], axis=1)
        keep = np.argsort(-best, axis=1, kind="stable")[:, :k]
        best, rows = np.take_along_axis(best, keep, 1), np.take_along_axis(rows, keep, 1)
    return rows


class RowWriter:
    """A float32 (capacity, d) .npy written front to back through a file handle (the page
    cache holds what it writes, not the writer's memory), its header sized up front; rows
    left unwritten read as zeros (the file is extended as a hole)."""

    def __init__(self, path: Path, dim: int, capacity: int) -> None:
        self.path, self.dim, self.capacity = Path(path), dim, capacity
        self.written = 0

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                  "fortran_order": False, "shape": (self.capacity, self.dim)}
        np.lib.format.write_array_header_1_0(self._handle, header)
        self._start = self._handle.tell()
        return self

    def write(self, rows: np.ndarray) -> None:
        if self.written + len(rows) > self.capacity:
            raise ValueError(f"{self.path}: more than {self.capacity} rows given, the "
                             "capacity its header was written for")
        np.ascontiguousarray(rows, dtype=np.float32).tofile(self._handle)
        self.written += len(rows)

    def __exit__(self, *exc: object) -> None:
        self._handle.truncate(self._start + self.capacity * self.dim * 4)
        self._handle.close()

    def rows(self) -> np.ndarray:
        """The rows written, memory-mapped read-only."""
        return np.load(self.path, mmap_mode="r")[:self.written]


def release(view: np.ndarray) -> None:
    """Unmap from this process the pages under `view`, plus RELEASE_MARGIN either side, if it
    lies in a memory-mapped file (np.memmap, np.load(mmap_mode=...)); nothing otherwise. The
    margin covers what the kernel maps around each fault (fault-around, large page-cache
    folios). Safe for any view of the file: a page is read back from the page cache when it
    is touched again. Releasing only this range, not the whole mapping, keeps the cost of a
    call independent of the file's size (it runs on every re-ranked query)."""
    handle = _mapping(view)
    if handle is None or handle.closed or view.size == 0:
        return
    offset = _offset(view, handle)
    first = max(offset - RELEASE_MARGIN, 0)
    first -= first % mmap.PAGESIZE
    last = min(offset + view.nbytes + RELEASE_MARGIN, len(handle))
    if last > first:
        handle.madvise(mmap.MADV_DONTNEED, first, last - first)


def _offset(array: np.ndarray, handle: mmap.mmap) -> int:
    """Where `array`'s first byte lies in the file `handle` maps."""
    return array.ctypes.data - np.frombuffer(handle, dtype=np.uint8).ctypes.data


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    while array is not None:
        handle = getattr(array, "_mmap", None)
        if isinstance(handle, mmap.mmap):  # a copy-on-write map would lose its changes
            return None if getattr(array, "mode", None) == "c" else handle
        array = array.base if isinstance(array.base, np.ndarray) else None
    return None
