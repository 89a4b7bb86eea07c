"""IVF-PQ indexes whose inverted lists live on disk, for corpora larger than RAM.

Built the way faiss's on-disk merge demo and autofaiss build them: train the coarse quantizer
and the PQ codebooks (and OPQ's rotation) on a sample (the coarse centroids on more rows by
two-level k-means when the lists outnumber what the sample feeds: `retrieval.ann.coarse`), fill
one *block* of lists per chunk of vectors from an empty copy of the trained index, then merge
every block into one lists file (`faiss.OnDiskInvertedLists`) that the search opens
memory-mapped. What stays in RAM while serving is the quantizer's centroids and the rotation
(`resident_bytes`); the codes are paged in by the OS as probes touch them. Building needs
memory for one chunk plus the trained index, never for the corpus, and the blocks can be
filled anywhere: `fill_block` is a plain function over files, run here (`fill_here`) or in
Ray tasks in parallel (`indexer.ray_build.fill_on_ray`).

The index holds the store's item ids itself (IVF lists store ids), so it is not wrapped in
IndexIDMap2, whose id map would grow with the corpus in RAM.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from retrieval.ann import coarse
from retrieval.ann.rowscan import gather_rows, row_chunks
from retrieval.atomic import replacing
from retrieval.errors import IndexStoreError
from retrieval.heap import release_freed_memory

BLOCK_ROWS = 1 << 16  # vectors a block holds: 128 MiB of float32 at 512 dimensions
_LIBC = ctypes.CDLL(None, use_errno=True)  # this process's C library (madvise)
OPQ_ITERATIONS = 10  # faiss's default 50 rounds cost minutes on a few cores for little recall
OPQ_MAX_TRAIN = 65_536  # faiss's OPQMatrix.max_train_points: the subsample OPQ trains on
MERGE_LISTS = 512  # lists merged between page releases (see merge_blocks)
DISK_PQ_BYTES = (64, 48, 32, 24, 16, 8)  # codes on disk cost no RAM: the largest that divides


class Training(NamedTuple):
    """How many rows train each part of an on-disk index (chosen by `ann` from the budget)."""

    sample: int  # the in-memory sample: PQ codebooks, and the coarse centroids by default
    coarse: int = 0  # more than `sample`: coarse centroids by two-level k-means over these
    rotation: int = OPQ_MAX_TRAIN  # OPQ's own subsample, the largest copy it holds
    rotation_iterations: int = OPQ_ITERATIONS


class DiskFiles(NamedTuple):
    index: Path  # the trained index, its list headers and the lists file's name
    lists: Path  # the inverted lists: codes and ids


def disk_pq_bytes(dim: int) -> int:
    return next((m for m in DISK_PQ_BYTES if dim % m == 0), 1 if dim < 8 else dim)


def resident_bytes(dim: int, nlist: int, opq: bool) -> int:
    """What a loaded on-disk index keeps in RAM: centroids, the rotation, list headers."""
    return nlist * dim * 4 + (dim * dim * 4 if opq else 0) + nlist * 24


def lists_bytes(count: int, pq_m: int) -> int:
    """The lists file: one code and one int64 id a vector."""
    return count * (pq_m + 8)


# given what maps vectors before the lists (OPQ's rotation, else nothing), the mapped sample
# and nlist: the (nlist, d) coarse centroids, trained on more rows than the sample
CoarseTrainer = Callable[[coarse.Transform, np.ndarray, int], np.ndarray]


def train(factory: str, sample: np.ndarray, sizes: Training,
          trainer: CoarseTrainer | None = None) -> faiss.Index:
    """An empty, trained index from `sample` (m, d) unit vectors; with a `trainer`, its coarse
    centroids come from that instead of the sample (`retrieval.ann.coarse`), the rotation and the
    PQ codebooks still from the sample."""
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    transform: coarse.Transform = np.asarray
    if isinstance(index, faiss.IndexPreTransform):
        rotation = faiss.downcast_VectorTransform(index.chain.at(0))
        rotation.niter, rotation.max_train_points = sizes.rotation_iterations, sizes.rotation
        if trainer is not None:  # the lists live in the rotated space: rotate first
            rotation.train(sample)
            transform = rotation.apply
    if trainer is not None:
        ivf = faiss.extract_index_ivf(index)
        ivf.quantizer.add(trainer(transform, transform(sample), ivf.nlist))  # then not retrained
    index.train(sample)
    return index


class BlockJob(NamedTuple):
    """One block to fill: a chunk of vectors (n, d), their ids (n,), the block file."""

    vectors: np.ndarray
    ids: np.ndarray
    out: Path


# fills every job's block from the trained index's file (this process: `fill_here`; Ray
# tasks: `indexer.ray_build.fill_on_ray`); the jobs are produced lazily, a chunk at a time
BlockFiller = Callable[[Path, Iterable[BlockJob]], None]


def fill_here(trained: Path, jobs: Iterable[BlockJob]) -> None:
    for job in jobs:
        fill_block(trained, *job)


def fill_block(trained: Path, vectors: np.ndarray, ids: np.ndarray, out: Path,
               threads: int | None = None) -> int:
    """Encode one chunk (n, d) under `ids` (n,) into a block file; returns n. Reads the trained
    index from a file, so it runs the same in this process or a worker elsewhere (`threads`:
    the cores faiss may use there, when a worker shares its machine with others)."""
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    index = faiss.read_index(str(trained))
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                       np.ascontiguousarray(ids, dtype=np.int64))
    with replacing(out) as temp:
        writer = faiss.FileIOWriter(str(temp))  # the lists alone: the merge needs no quantizer
        faiss.write_InvertedLists(faiss.extract_index_ivf(index).invlists, writer)
        del writer  # closes the file
    return len(ids)


def _block_lists(path: Path) -> faiss.Index:
    """A block's lists, memory-mapped (pages are read as the merge copies them), held by a
    small IVF index that owns them, so they are unmapped when it is freed (faiss's Python
    wrapper cannot own an InvertedLists itself)."""
    lists = faiss.read_InvertedLists(faiss.FileIOReader(str(path)), faiss.IO_FLAG_MMAP)
    size = lists.code_size
    holder = faiss.IndexIVFPQ(faiss.IndexFlatIP(size), size, lists.nlist, size, 8)
    holder.replace_invlists(lists, True)  # (the wrapper keeps its empty quantizer alive)
    return holder


def merge_blocks(trained: Path, blocks: Sequence[Path], files: DiskFiles,
                 base: faiss.Index | None = None) -> None:
    """Merge the lists of `base` (a loaded on-disk index, e.g. the parent generation's) and of
    the blocks into one lists file, and write the index that points at it.

    The lists are copied MERGE_LISTS at a time, and after each group the pages of every mapped
    file are handed back (`_release`): faiss's own merge_from_multiple copies them all in one
    call, and every page it touched (the blocks' and the new file's, twice the lists' size)
    stays in the process's resident set until it returns: 1.4 GB at 10,000,000 vectors.
    The index records the lists file's path as it was written; `load` maps the lists from
    the path it is given instead (generations are written in a temp folder, then renamed)."""
    index = faiss.read_index(str(trained))
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(files.lists))
    opened = [_block_lists(block) for block in blocks]
    sources = [faiss.extract_index_ivf(source).invlists
               for source in ([base] if base is not None else []) + opened]
    sizes = np.array([[source.list_size(number) for number in range(ivf.nlist)]
                      for source in sources], dtype=np.uint64).reshape(len(sources), ivf.nlist)
    totals = sizes.sum(axis=0, dtype=np.uint64)
    total = int(totals.sum())
    with _stdout_to_stderr():  # faiss prints "resizing FILE" to stdout, where JSON goes
        lists.update_totsize(total * (ivf.code_size + 8))
    lists.set_all_lists_sizes(faiss.swig_ptr(totals))
    for first in range(0, ivf.nlist, MERGE_LISTS):
        for number in range(first, min(first + MERGE_LISTS, ivf.nlist)):
            done = 0
            for source, count in zip(sources, sizes[:, number].tolist()):
                if count:
                    lists.update_entries(number, done, count, source.get_ids(number),
                                         source.get_codes(number))
                    done += count
        for mapped in (lists, *sources):
            _release(mapped)
    ivf.replace_invlists(lists, False)  # `lists` stays owned by Python until written
    ivf.ntotal = index.ntotal = total
    faiss.write_index(index, str(files.index))
    del opened, sources


def _release(lists: faiss.InvertedLists) -> None:
    """Unmap from this process the pages of an on-disk lists file (they stay in the page
    cache, dirty ones are written back as usual; a later read maps them again)."""
    lists = faiss.downcast_InvertedLists(lists)
    if not isinstance(lists, faiss.OnDiskInvertedLists) or not lists.totsize:
        return
    start = faiss.rev_swig_ptr(lists.ptr, 1).ctypes.data
    first = start - start % mmap.PAGESIZE
    _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(start - first + lists.totsize),
                  mmap.MADV_DONTNEED)


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for a moment (C code's printf bypasses sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def build(factory: str, vectors: np.ndarray, ids: np.ndarray, files: DiskFiles,
          sizes: Training, seed: int = 0, fill: BlockFiller = fill_here) -> faiss.Index:
    """Train on a seeded sample, fill blocks chunk by chunk (with `fill`), merge into `files`;
    returns the index, loaded as `load` does. When `sizes.coarse` is more than the sample,
    the coarse centroids are trained on that many rows by two-level k-means
    (`retrieval.ann.coarse`), which needs no more memory than the sample does."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), min(sizes.sample, len(vectors)), replace=False)
    wide = min(sizes.coarse, len(vectors))
    picked = np.sort(rng.choice(len(vectors), wide, replace=False)) if wide > len(rows) else None
    scratch = files.index.with_name(files.index.name + ".coarse.npy")

    def two_level(transform: coarse.Transform, mapped: np.ndarray, nlist: int) -> np.ndarray:
        return coarse.centroids(vectors, picked, nlist, mapped, transform, scratch, seed)

    trained = files.index.with_name(files.index.name + ".trained")
    faiss.write_index(train(factory, gather_rows(vectors, np.sort(rows)), sizes,
                            two_level if picked is not None else None), str(trained))
    release_freed_memory()  # the sample and training's copies: the rest of the build is small
    return _fill_and_merge(trained, vectors, ids, files, None, fill)


def extend(base: faiss.Index, vectors: np.ndarray, ids: np.ndarray,
           files: DiskFiles, fill: BlockFiller = fill_here) -> faiss.Index:
    """A new on-disk index in `files` holding `base`'s lists plus `vectors` (n, d) under
    `ids`, encoded with `base`'s own quantizer and codebooks (nothing is retrained, and what
    `base` holds is copied list by list, never loaded whole)."""
    trained = files.index.with_name(files.index.name + ".trained")
    faiss.write_index(_emptied(base), str(trained))
    return _fill_and_merge(trained, vectors, ids, files, base, fill)


def _emptied(index: faiss.Index) -> faiss.Index:
    """A trained copy of an on-disk index with empty in-memory lists (a block's template)."""
    scratch = faiss.serialize_index(index)  # its lists are on disk: only headers serialise
    copy = faiss.deserialize_index(scratch, faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf = faiss.extract_index_ivf(copy)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns and frees it now
    ivf.ntotal = copy.ntotal = 0
    return copy


def _fill_and_merge(trained: Path, vectors: np.ndarray, ids: np.ndarray, files: DiskFiles,
                    base: faiss.Index | None, fill: BlockFiller) -> faiss.Index:
    """Blocks of BLOCK_ROWS vectors from `trained`, merged (after `base`) into the final
    files; the trained index and the blocks are scratch files, removed before returning."""
    blocks = [files.index.with_name(f"{files.index.name}.block-{number:05d}")
              for number in range(-(-len(vectors) // BLOCK_ROWS))]
    try:
        fill(trained, (BlockJob(part, ids[start:start + BLOCK_ROWS], blocks[number])
                       for number, (start, part) in enumerate(row_chunks(vectors, BLOCK_ROWS))))
        merge_blocks(trained, blocks, files, base)
    finally:
        for scratch in [trained, *blocks]:
            scratch.unlink(missing_ok=True)
    return load(files)


def load(files: DiskFiles) -> faiss.Index:
    """Open an on-disk index with its lists file memory-mapped read-only.

    faiss's own IO_FLAG_ONDISK_SAME_DIR finds a moved lists file too but prints to stdout,
    which would corrupt `clipdex search --json`; so the lists are skipped at read and mapped
    here from the path the store names."""
    index = faiss.read_index(str(files.index), faiss.IO_FLAG_SKIP_IVF_DATA)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise IndexStoreError(f"{files.index}: not an index with on-disk lists")
    if files.lists.stat().st_size < lists.totsize:  # mapping past the end would crash
        raise IndexStoreError(f"{files.lists} is shorter than its index says")
    lists.filename = str(files.lists)
    lists.read_only = True
    lists.do_mmap()
    # faiss starts prefetch threads on every search to touch the probed lists first; with the
    # lists in the page cache that costs more than it saves (nprobe 192: 4.2 -> 2.8 ms)
    lists.prefetch_nthread = 0
    return index


def lists_on_disk(index: faiss.Index) -> bool:
    """Whether an index's inverted lists are an on-disk (memory-mapped) file."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def release_lists(index: faiss.Index) -> None:
    """Hand back the mapped pages of an index's on-disk lists (nothing for other indexes):
    after a batch of searches that touched most lists, which would otherwise stay resident."""
    if lists_on_disk(index):
        _release(faiss.extract_index_ivf(index).invlists)
