"""ENOSPC in the middle of writing a generation: a clear IndexStoreError naming the generation
folder, CURRENT still names the previous generation, which opens and searches, and nothing
half-written is left behind."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import retrieval.store.commit as store_commit
from retrieval.errors import IndexStoreError
from retrieval.store import ItemRecord, open_generation, update_generation, write_generation
from tests.reliability.helpers import FLAT, MODEL, small_generation, unit_vectors


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_manifest(monkeypatch):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "manifest.json":
            disk_full()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def _fail_current(monkeypatch):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "CURRENT.tmp":
            disk_full()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def _fail_second_faiss(monkeypatch):
    real, calls = store_commit.faiss.write_index, []

    def write_index(index, path):
        calls.append(path)
        if len(calls) == 2:
            disk_full()
        return real(index, path)

    monkeypatch.setattr(store_commit.faiss, "write_index", write_index)


FAULTS = {
    "faiss.write_index": lambda mp: mp.setattr(store_commit.faiss, "write_index", disk_full),
    "second faiss file": _fail_second_faiss,
    "np.save": lambda mp: mp.setattr(store_commit.np, "save", disk_full),
    "manifest.json": _fail_manifest,
    "fsync": lambda mp: mp.setattr(store_commit.os, "fsync", disk_full),
    "CURRENT pointer": _fail_current,
}


def new_items() -> tuple[list[ItemRecord], dict[str, np.ndarray]]:
    records = [ItemRecord(100, "image", path="/photos/new.png"),
               ItemRecord(101, "text", text="a new caption")]
    return records, {"image": unit_vectors(1, 7), "text": unit_vectors(1, 8)}


def assert_previous_is_served(root: Path, name: str) -> None:
    assert (root / "CURRENT").read_text().strip() == name
    visible = sorted(p.name for p in (root / "generations").iterdir())
    assert visible == [name], f"left behind: {visible}"
    assert not (root / "CURRENT.tmp").exists()
    with open_generation(root, MODEL.sha256, MODEL.embed_dim) as generation:
        assert generation.name == name and generation.count("image") == 6
        _, ids = generation.search("image", unit_vectors(2, 3), 3)
        assert ids.shape == (2, 3) and set(ids.ravel()) <= set(range(1, 7))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_disk_full_during_an_update_keeps_the_previous_generation(tmp_path, monkeypatch, fault):
    root = tmp_path / "index"
    name = small_generation(root)
    FAULTS[fault](monkeypatch)
    records, vectors = new_items()
    with pytest.raises(IndexStoreError, match="disk full") as raised:
        update_generation(root, MODEL, add=records, add_vectors=vectors, options=FLAT)
    assert str(root / "generations") in str(raised.value)
    monkeypatch.undo()
    assert_previous_is_served(root, name)
    # Space comes back: the next write succeeds and sees the new items.
    update_generation(root, MODEL, add=records, add_vectors=vectors, options=FLAT)
    with open_generation(root, MODEL.sha256, MODEL.embed_dim) as generation:
        assert generation.count("image") == 7


def test_disk_full_during_a_whole_rewrite_keeps_the_previous_generation(tmp_path, monkeypatch):
    root = tmp_path / "index"
    name = small_generation(root)
    FAULTS["np.save"](monkeypatch)
    records, vectors = new_items()
    with pytest.raises(IndexStoreError, match="disk full"):
        write_generation(root, MODEL, records, vectors, FLAT)
    monkeypatch.undo()
    assert_previous_is_served(root, name)


def test_disk_full_on_the_first_generation_leaves_no_current(tmp_path, monkeypatch):
    root = tmp_path / "index"
    FAULTS["faiss.write_index"](monkeypatch)
    records, vectors = new_items()
    with pytest.raises(IndexStoreError, match="disk full"):
        write_generation(root, MODEL, records, vectors, FLAT)
    assert not (root / "CURRENT").exists()
    assert list((root / "generations").iterdir()) == []


def test_other_os_errors_are_not_dressed_up_as_disk_full(tmp_path, monkeypatch):
    root = tmp_path / "index"
    name = small_generation(root)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store_commit.np, "save", denied)
    records, vectors = new_items()
    with pytest.raises(PermissionError):
        update_generation(root, MODEL, add=records, add_vectors=vectors, options=FLAT)
    monkeypatch.undo()
    assert_previous_is_served(root, name)


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB tmpfs (needs root, or skips): the kernel says ENOSPC, not a monkeypatch."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          check=False, capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("room", [2_000, 20_000, 60_000, 200_000, 600_000])
def test_a_really_full_disk_keeps_the_previous_generation(small_disk, room):
    """Leave `room` bytes free, then write a generation that needs more: wherever the kernel
    says no (FAISS, numpy, SQLite, the manifest), the error says disk full and nothing moves."""
    root = small_disk / "index"
    name = small_generation(root)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(small_disk / "filler", "wb") as filler:
        filler.write(b"\0" * max(0, free - room))
    count = 4000
    records = [ItemRecord(100 + i, "image", path=f"/photos/new{i}.png") for i in range(count)]
    vectors = {"image": unit_vectors(count, 7), "text": unit_vectors(0, 8)}
    with pytest.raises(IndexStoreError, match="disk full"):
        update_generation(root, MODEL, add=records, add_vectors=vectors, options=FLAT)
    assert_previous_is_served(root, name)
    (small_disk / "filler").unlink()  # space comes back: the same write now lands
    update_generation(root, MODEL, add=records, add_vectors=vectors, options=FLAT)
    with open_generation(root, MODEL.sha256, MODEL.embed_dim) as generation:
        assert generation.count("image") == 6 + count
