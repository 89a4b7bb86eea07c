"""Writing index generations: whole new ones, and updates derived from the current one.

The format itself is described in `retrieval.store.read`; everything here writes into a
temp folder, fsyncs, renames it into place and only then replaces CURRENT.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval import ann
from retrieval.card import sha256_file
from retrieval.errors import (
    IndexStoreError,
    UnknownItemError,
)
from retrieval.store.read import (
    _SCHEMA,
    FORMAT,
    MAX_TUNING_QUERIES,
    MODALITIES,
    PLURAL,
    Generation,
    ItemRecord,
    ModelIdentity,
    StoreOptions,
    current_name,
    maybe_fault,
    open_generation,
)

DEFAULT_OPTIONS = StoreOptions()


@dataclass
class _Table:
    """One modality being written: row-aligned ids (n,), vectors (n, d), tombstones (n,)."""

    ids: np.ndarray
    vectors: np.ndarray
    deleted: np.ndarray
    index: faiss.Index | None = None  # reused from the parent generation when still right
    spec: ann.IndexSpec | None = None


def write_generation(root: Path, model: ModelIdentity, records: Sequence[ItemRecord],
                     vectors: dict[str, np.ndarray], options: StoreOptions = DEFAULT_OPTIONS,
                     build_info: dict[str, Any] | None = None) -> str:
    """Write a whole new generation from records and their (n_modality, d) embeddings
    (rows in record order per modality); returns the generation's name."""
    tables = {}
    for modality in MODALITIES:
        ids = np.array([r.id for r in records if r.modality == modality], dtype=np.int64)
        matrix = _as_matrix(vectors.get(modality), len(ids), model.embed_dim, modality)
        order = np.argsort(ids, kind="stable")
        tables[modality] = _Table(ids[order], matrix[order], np.zeros(len(ids), bool))
    if len({r.id for r in records}) != len(records):
        raise IndexStoreError("item ids must be unique")
    next_id = max((r.id for r in records), default=0) + 1

    def fill(db: sqlite3.Connection) -> None:
        db.executescript(_SCHEMA)
        _insert(db, records)

    with _writer_lock(root):
        return _commit(root, model, tables, fill, options, next_id, None, build_info or {})


def update_generation(root: Path, model: ModelIdentity, add: Sequence[ItemRecord] = (),
                      add_vectors: dict[str, np.ndarray] | None = None,
                      delete_ids: Iterable[int] = (), options: StoreOptions = DEFAULT_OPTIONS,
                      compact: bool | None = None,
                      build_info: dict[str, Any] | None = None) -> str:
    """Derive a new generation from CURRENT: append items (ids >= next_id, embeddings given),
    tombstone `delete_ids` (an image takes its captions along), and compact when asked or
    when tombstones pass `options.compact_ratio`. Nothing already stored is re-encoded."""
    with _writer_lock(root):
        parent = open_generation(root, model.sha256, model.embed_dim)
        try:
            return _update(root, parent, model, list(add), add_vectors or {}, delete_ids,
                           options, compact, build_info or {})
        finally:
            parent.close()


@dataclass(frozen=True)
class Appended:
    generation: str  # the new generation's name
    ids: list[int]  # the ids the added records got, in the order given


def append_items(root: Path, model: ModelIdentity, records: Sequence[ItemRecord],
                 vectors: dict[str, np.ndarray], options: StoreOptions = DEFAULT_OPTIONS,
                 build_info: dict[str, Any] | None = None) -> Appended:
    """Add `records` with ids allocated under the writer lock, so concurrent writers (an
    `index add` and the service's admin API) never collide or fail on stale ids.

    The records' ids are provisional: a contiguous block (any base, say 0..n-1) that is
    shifted to start at the current generation's next id; `image_id` links that point into
    the block shift with it, links to items already stored are kept."""
    block = [r.id for r in records]
    base = min(block, default=0)
    if sorted(block) != list(range(base, base + len(block))):
        raise IndexStoreError("provisional item ids must be one contiguous block")
    with _writer_lock(root):
        parent = open_generation(root, model.sha256, model.embed_dim)
        try:
            shift, end = parent.next_id - base, base + len(block)
            placed = [replace(r, id=r.id + shift, image_id=(
                r.image_id + shift if r.image_id is not None and base <= r.image_id < end
                else r.image_id)) for r in records]
            name = _update(root, parent, model, placed, vectors, (), options, None,
                           build_info or {})
        finally:
            parent.close()
    return Appended(name, [r.id for r in placed])


def _update(root: Path, parent: Generation, model: ModelIdentity, add: list[ItemRecord],
            add_vectors: dict[str, np.ndarray], delete_ids: Iterable[int],
            options: StoreOptions, compact: bool | None, build_info: dict[str, Any]) -> str:
    if any(r.id < parent.next_id for r in add):
        raise IndexStoreError(f"new item ids must be >= {parent.next_id} (the index's next id)")
    doomed = {int(i) for i in delete_ids}
    unknown = [i for i, item in zip(sorted(doomed), parent.items(sorted(doomed))) if item is None]
    if unknown:
        raise UnknownItemError(f"cannot delete ids {unknown[:10]}: not live in {parent.name}")
    doomed |= set(parent.caption_ids(doomed))
    tables = {m: _grown_table(parent, m, [r for r in add if r.modality == m],
                              add_vectors.get(m), doomed) for m in MODALITIES}
    rows = sum(len(t.ids) for t in tables.values())
    dead = sum(int(t.deleted.sum()) for t in tables.values())
    if compact is None:
        compact = rows > 0 and dead / rows > options.compact_ratio
    if compact:
        tables = {m: _compacted(t) for m, t in tables.items()}
    next_id = max([parent.next_id] + [r.id + 1 for r in add])

    def fill(db: sqlite3.Connection) -> None:
        _copy_database(parent.path / "items.sqlite", db)
        _insert(db, add)
        _mark_deleted(db, doomed)
        if compact:
            db.execute("DELETE FROM items WHERE deleted = 1")

    info = {**build_info, "compacted": bool(compact), "deleted_now": len(doomed)}
    return _commit(root, model, tables, fill, options, next_id, parent.name, info)


def _grown_table(parent: Generation, modality: str, new: list[ItemRecord],
                 new_vectors: np.ndarray | None, doomed: set[int]) -> _Table:
    ids, vectors = parent.all_vectors(modality, live_only=False)
    new_ids = np.array([r.id for r in new], dtype=np.int64)
    new_matrix = _as_matrix(new_vectors, len(new), parent.embed_dim, modality)
    order = np.argsort(new_ids, kind="stable")  # ids stay ascending for searchsorted
    new_ids, new_matrix = new_ids[order], new_matrix[order]
    was_deleted = np.isin(ids, parent._deleted[modality])
    table = _Table(np.concatenate([ids, new_ids]),
                   np.concatenate([np.asarray(vectors), new_matrix]),
                   np.concatenate([was_deleted, np.zeros(len(new), bool)]))
    table.deleted |= np.isin(table.ids, np.fromiter(doomed, np.int64, len(doomed)))
    section = parent.manifest["modalities"][modality]
    table.spec = ann.IndexSpec(**section["index"])
    table.index = faiss.clone_index(parent._indexes[modality])
    ann.add(table.index, new_matrix, new_ids)
    return table


def _compacted(table: _Table) -> _Table:
    keep = ~table.deleted
    return _Table(table.ids[keep], table.vectors[keep], table.deleted[keep])


def _as_matrix(vectors: np.ndarray | None, count: int, dim: int, modality: str) -> np.ndarray:
    if vectors is None:
        vectors = np.zeros((0, dim), np.float32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (count, dim):
        raise IndexStoreError(f"{modality} embeddings have shape {vectors.shape}, "
                              f"expected ({count}, {dim})")
    return vectors


def _commit(root: Path, model: ModelIdentity, tables: dict[str, _Table], fill: Any,
            options: StoreOptions, next_id: int, parent: str | None,
            build_info: dict[str, Any]) -> str:
    """Write files into a temp folder, fsync, rename into place, then switch CURRENT."""
    root = Path(root)
    generations = root / "generations"
    generations.mkdir(parents=True, exist_ok=True)
    name = f"{_last_number(generations) + 1:06d}"
    temp = generations / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        return _write_and_switch(root, model, tables, fill, options, next_id, parent,
                                 build_info, name, temp)
    # FAISS reports a failed write as RuntimeError and SQLite as sqlite3.Error, not OSError
    except (OSError, RuntimeError, sqlite3.Error) as error:
        # CURRENT still names the previous generation: drop ours
        full = _is_disk_full(error, generations)
        shutil.rmtree(temp, ignore_errors=True)
        (root / "CURRENT.tmp").unlink(missing_ok=True)
        if (root / "CURRENT").is_file() and current_name(root) != name:
            shutil.rmtree(generations / name, ignore_errors=True)
        if full:
            raise IndexStoreError(f"disk full while writing generation {generations / name} "
                                  f"({error}); CURRENT is unchanged, free space and retry"
                                  ) from error
        raise


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    """Each writer words it differently (errno, FAISS's message, SQLite's, numpy's short
    write without an errno), so also ask the file system whether it is out of space."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    if "No space left on device" in text or "disk is full" in text:
        return True
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20


def _write_and_switch(root: Path, model: ModelIdentity, tables: dict[str, _Table], fill: Any,
                      options: StoreOptions, next_id: int, parent: str | None,
                      build_info: dict[str, Any], name: str, temp: Path) -> str:
    generations = root / "generations"
    temp.mkdir()
    sections = _write_tables(temp, tables, options)
    db = sqlite3.connect(temp / "items.sqlite")
    with db:
        fill(db)
    db.close()
    maybe_fault("mid_generation")
    files = sorted(p for p in temp.iterdir() if p.is_file())
    manifest = _manifest(model, sections, next_id, name, parent, build_info,
                         {p.name: sha256_file(p) for p in files})
    (temp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for path in temp.iterdir():
        _fsync(path)
    _fsync(temp)
    os.rename(temp, generations / name)
    _fsync(generations)
    maybe_fault("before_current")
    previous = current_name(root) if (root / "CURRENT").is_file() else None
    pointer = root / "CURRENT.tmp"
    pointer.write_text(name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / "CURRENT")
    _fsync(root)
    _prune(generations, keep={name, previous})
    return name


def _write_tables(folder: Path, tables: dict[str, _Table],
                  options: StoreOptions) -> dict[str, dict[str, Any]]:
    sections = {}
    for modality, table in tables.items():
        other_modality = MODALITIES[1 - MODALITIES.index(modality)]
        other = tables[other_modality]
        queries = other.vectors[~other.deleted]
        if len(queries) > MAX_TUNING_QUERIES:
            rows = np.random.default_rng(0).choice(len(queries), MAX_TUNING_QUERIES, False)
            queries = queries[np.sort(rows)]
        index, spec = _index_for(table, options)
        spec, report = ann.tune(index, spec, table.vectors, table.ids, queries,
                                query_source=PLURAL[other_modality])
        plural = PLURAL[modality]
        faiss.write_index(index, str(folder / f"{plural}.faiss"))
        np.save(folder / f"{plural}.npy", table.vectors)
        np.save(folder / f"{plural}.ids.npy", table.ids)
        sections[modality] = {"rows": len(table.ids), "live": int((~table.deleted).sum()),
                              "deleted": int(table.deleted.sum()), "index": spec.as_dict(),
                              "tuning": report}
    return sections


def _index_for(table: _Table, options: StoreOptions) -> tuple[faiss.Index, ann.IndexSpec]:
    """Reuse the parent's index when the size rule still picks its kind; else build anew."""
    dim = table.vectors.shape[1]
    wanted = ann.choose_index(len(table.ids), dim, options.max_memory, options.index_kind)
    if table.index is not None and table.spec is not None and table.spec.kind == wanted.kind:
        return table.index, table.spec
    return ann.build_index(wanted, table.vectors, table.ids), wanted


def _manifest(model: ModelIdentity, sections: dict[str, Any], next_id: int, name: str,
              parent: str | None, build_info: dict[str, Any],
              files: dict[str, str]) -> dict[str, Any]:
    return {
        "format": FORMAT, "generation": name, "parent": parent,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "clipdex_version": _version(),
        "model": {"sha256": model.sha256, "arch": model.arch, "embed_dim": model.embed_dim},
        "embed_dim": model.embed_dim, "metric": "inner_product", "normalization": "l2",
        "next_id": next_id, "modalities": sections, "files": files, "build": build_info,
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipdex")
    except PackageNotFoundError:
        return "unknown"


def _insert(db: sqlite3.Connection, records: Iterable[ItemRecord]) -> None:
    db.executemany(
        "INSERT INTO items (id, modality, path, text, captions, metadata, image_id, deleted) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
        ((r.id, r.modality, r.path, r.text, json.dumps(r.captions),
          json.dumps(r.metadata, default=str), r.image_id) for r in records))


def _mark_deleted(db: sqlite3.Connection, ids: set[int]) -> None:
    db.executemany("UPDATE items SET deleted = 1 WHERE id = ?", ((i,) for i in sorted(ids)))


def _copy_database(source: Path, target: sqlite3.Connection) -> None:
    """Copy the parent's rows with SQLite's backup API (no pickling, no re-insert in Python)."""
    parent = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        parent.backup(target)
    finally:
        parent.close()


def _last_number(generations: Path) -> int:
    numbers = [int(p.name) for p in generations.iterdir() if p.name.isdigit()]
    return max(numbers, default=0)


def _prune(generations: Path, keep: set[str | None]) -> None:
    """Keep the new generation and the one it replaced (KEEP_GENERATIONS = 2); drop older
    ones and whatever writers killed mid-way left behind (temp folders, never-current ones)."""
    for path in generations.iterdir():
        if path.name.startswith(".tmp-") or (path.name.isdigit() and path.name not in keep):
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    """One writer at a time per index directory (readers never lock)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
