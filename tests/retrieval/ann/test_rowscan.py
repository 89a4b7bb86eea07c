"""Scanning a memory-mapped matrix leaves none of it resident in the process: a build over
vectors larger than RAM keeps its memory to a chunk."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

from retrieval.ann.rowscan import gather_rows, row_chunks


def resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0]:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_scan_over_a_mapped_file_leaves_none_of_it_resident(tmp_path):
    path = tmp_path / "rows.npy"
    values = np.arange(4096 * 256, dtype=np.float32).reshape(4096, 256)  # 4 MiB
    np.save(path, values)
    rows = np.load(path, mmap_mode="r")
    chunks = list(row_chunks(rows, 500))
    assert [start for start, _ in chunks] == list(range(0, 4096, 500))
    assert np.array_equal(np.concatenate([chunk for _, chunk in chunks]), values)
    assert resident_kib(path) == 0
    assert float(np.asarray(rows).sum()) == float(values.sum())  # a plain read, for contrast
    assert resident_kib(path) >= 4000


def test_gathering_rows_from_a_mapped_file_equals_fancy_indexing(tmp_path):
    path = tmp_path / "rows.npy"
    values = np.random.default_rng(0).normal(size=(3000, 8)).astype(np.float16)
    np.save(path, values)
    rows = np.load(path, mmap_mode="r")
    positions = np.sort(np.random.default_rng(1).choice(3000, 700, replace=False))
    gathered = gather_rows(rows, positions, size=256)
    assert gathered.dtype == np.float32
    assert np.array_equal(gathered, values[positions].astype(np.float32))
    assert resident_kib(path) == 0
    assert gather_rows(values, np.array([], np.int64)).shape == (0, 8)


def test_re_ranking_lookups_leave_a_mapped_corpus_unresident(tmp_path):
    from retrieval.ann.engines import sorted_lookup

    path = tmp_path / "rows.npy"
    values = np.arange(2048 * 256, dtype=np.float32).reshape(2048, 256)
    np.save(path, values)
    lookup = sorted_lookup(np.arange(10, 2058), np.load(path, mmap_mode="r"))
    wanted = np.random.default_rng(0).choice(np.arange(10, 2058), 500)
    assert np.array_equal(lookup(wanted), values[wanted - 10])
    assert resident_kib(path) == 0


def test_gathering_in_any_order_with_repeats(tmp_path):
    path = tmp_path / "rows.npy"
    values = np.random.default_rng(2).normal(size=(1000, 4)).astype(np.float32)
    np.save(path, values)
    positions = np.array([999, 3, 500, 3, 0, 998, 257])
    assert np.array_equal(gather_rows(np.load(path, mmap_mode="r"), positions, size=256),
                          values[positions])


def cached_pages(path: Path) -> np.ndarray:
    """Which pages of `path` are in the page cache (mincore over a fresh mapping)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mm:
        address = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        flags = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), flags) == 0
        return np.frombuffer(flags, dtype=np.uint8).copy() & 1


def evict(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # dirty pages stay cached
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def test_gathering_a_few_rows_reads_their_pages_not_the_files_readahead_window(tmp_path):
    """A cold fault reads the device's whole readahead window (8 MiB on some disks), one fault
    at a time; re-ranking 40 rows of a 20 GB file read gigabytes that way. The rows' pages
    are asked for up front instead, and nothing else is read."""
    path = tmp_path / "rows.npy"
    values = np.random.default_rng(0).normal(size=(8192, 512)).astype(np.float32)  # 16 MiB
    np.save(path, values)
    rows = np.load(path, mmap_mode="r")
    evict(path)
    assert cached_pages(path).sum() == 0, "the page cache kept the file (tmpfs?)"
    wanted = np.array([6000, 10, 3000, 10])
    assert np.array_equal(gather_rows(rows, wanted), values[wanted])
    cached = cached_pages(path)
    header = np.load(path, mmap_mode="r").offset
    page_of = lambda row: (header + row * 2048) // mmap.PAGESIZE
    assert all(cached[page_of(row)] for row in (10, 3000, 6000))
    assert cached.sum() <= 12  # each row's page or two, not the 4096 pages of the file
