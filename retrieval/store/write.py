"""Writer transactions: a whole new generation, or one derived from CURRENT (items added,
allocated ids, tombstones, compaction), each under the index directory's file lock and
committed atomically by `retrieval.store.commit`."""

from __future__ import annotations

import fcntl
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.ann import engines as ann
from retrieval.errors import DuplicateItemError, IndexStoreError, UnknownItemError
from retrieval.models.choices import MODALITIES
from retrieval.models.identity import ModelIdentity
from retrieval.store import layout, media
from retrieval.store.commit import Plan, StoreOptions, Table, commit, save_rows
from retrieval.store.layout import SCHEMA
from retrieval.store.manifest import GenerationManifest
from retrieval.store.read import Generation, open_generation
from retrieval.store.records import ItemRecord, StreamedRecords, insert

DEFAULT_OPTIONS = StoreOptions()


@dataclass(frozen=True)
class Appended:
    generation: str  # the new generation's name
    ids: list[int]  # the ids the added records got, in the order given
    manifest: GenerationManifest  # what the new generation's manifest says


@dataclass(frozen=True)
class Changes:
    """What a derived generation changes: items added, items deleted (an image takes its
    captions along), and whether to compact (None: when tombstones pass the ratio)."""

    add: Sequence[ItemRecord] = ()
    vectors: dict[str, np.ndarray] | None = None  # modality -> (n, d), rows in record order
    delete_ids: Iterable[int] = ()
    delete_paths: Sequence[str] = ()  # live images by stored path
    compact: bool | None = None
    media_roots: Sequence[str | Path] = ()  # joining the parent's
    # live images that keep their id and embedding under a new path and metadata (a file
    # moved or renamed, or only touched: same content)
    repath: dict[int, tuple[str, dict[str, Any]]] = field(default_factory=dict)


def write_generation(root: Path, model: ModelIdentity,
                     records: Sequence[ItemRecord] | StreamedRecords,
                     vectors: dict[str, np.ndarray], options: StoreOptions = DEFAULT_OPTIONS,
                     build_info: dict[str, Any] | None = None,
                     media_roots: Sequence[str | Path] = ()) -> str:
    """Write a whole new generation from records and their (n_modality, d) embeddings
    (rows in record order per modality; they may be memory-mapped); returns the
    generation's name. `media_roots`: the folders whose files it may serve. StreamedRecords keep the records out of memory: their rows must be
    in ascending id order already."""
    if isinstance(records, StreamedRecords):
        ids = {m: np.asarray(records.ids.get(m, np.zeros(0)), np.int64) for m in MODALITIES}
        if any(np.any(np.diff(i) <= 0) for i in ids.values()):
            raise IndexStoreError("streamed records' ids must be ascending and unique")
        fill = _streamed_fill(records, ids)
    else:
        ids = {m: np.array([r.id for r in records if r.modality == m], dtype=np.int64)
               for m in MODALITIES}
        fill = _listed_fill(records)
    every = np.concatenate(list(ids.values()))
    if len(np.unique(every)) != len(every):
        raise IndexStoreError("item ids must be unique")
    tables = {m: _new_table(ids[m], _as_matrix(vectors.get(m), len(ids[m]), model.embed_dim, m))
              for m in MODALITIES}
    next_id = int(every.max(initial=0)) + 1 if len(every) else 1
    plan = Plan(model, next_id, None, build_info or {}, options,
                media_roots=tuple(media.cover(media_roots)))
    with _writer_lock(root):
        return commit(root, plan, tables, fill).name


def _new_table(ids: np.ndarray, matrix: np.ndarray) -> Table:
    """Rows in ascending id order (the store's layout); rows already in order are not
    copied, so memory-mapped vectors stay on disk."""
    if np.any(np.diff(ids) <= 0):
        order = np.argsort(ids, kind="stable")
        ids, matrix = ids[order], matrix[order]
    return Table(ids, matrix, np.zeros(len(ids), bool))


def _listed_fill(records: Sequence[ItemRecord]) -> Callable[[sqlite3.Connection], None]:
    def fill(db: sqlite3.Connection) -> None:
        db.executescript(SCHEMA)
        insert(db, records)
    return fill


def _streamed_fill(records: StreamedRecords, ids: dict[str, np.ndarray]
                   ) -> Callable[[sqlite3.Connection], None]:
    def fill(db: sqlite3.Connection) -> None:
        db.executescript(SCHEMA)
        for batch in records.batches():
            insert(db, batch)
        for modality, expected in ids.items():
            count, low, high = db.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM items "
                                          "WHERE modality = ?", (modality,)).fetchone()
            if (count, low, high) != (len(expected), *((int(expected[0]), int(expected[-1]))
                                                       if len(expected) else (None, None))):
                raise IndexStoreError(f"streamed {modality} records do not match their ids: "
                                      f"{count} rows, ids {low}..{high}, expected "
                                      f"{len(expected)}")
    return fill


def update_generation(root: Path, model: ModelIdentity, add: Sequence[ItemRecord] = (),
                      add_vectors: dict[str, np.ndarray] | None = None,
                      delete_ids: Iterable[int] = (), options: StoreOptions = DEFAULT_OPTIONS,
                      compact: bool | None = None, build_info: dict[str, Any] | None = None,
                      delete_paths: Sequence[str] = (),
                      media_roots: Sequence[str | Path] = (),
                      repath: dict[int, tuple[str, dict[str, Any]]] | None = None) -> str:
    """Derive a new generation from CURRENT: append items (ids >= next_id, embeddings given),
    tombstone `delete_ids` and the live images stored under `delete_paths` (an image takes
    its captions along), and compact when asked or when tombstones pass
    `options.compact_ratio`. Nothing already stored is re-encoded. Returns its name.
    `media_roots` join the parent's (the folders whose files may be served); `repath` moves
    live images to a new path and metadata, keeping their ids and embeddings."""
    changes = Changes(list(add), add_vectors, delete_ids, delete_paths, compact, media_roots,
                      repath or {})
    with _writer_lock(root):
        parent = open_generation(root, model.sha256, model.embed_dim)
        try:
            return _derive(root, parent, model, changes, options, build_info or {}).name
        finally:
            parent.close()


def append_items(root: Path, model: ModelIdentity, records: Sequence[ItemRecord],
                 vectors: dict[str, np.ndarray], options: StoreOptions = DEFAULT_OPTIONS,
                 build_info: dict[str, Any] | None = None,
                 media_roots: Sequence[str | Path] = (), unique_paths: bool = False,
                 delete_ids: Iterable[int] = (),
                 repath: dict[int, tuple[str, dict[str, Any]]] | None = None) -> Appended:
    """Add `records` with ids allocated under the writer lock, so concurrent writers (an
    `index add` and the service's admin API) never collide or fail on stale ids. In the same
    generation, `delete_ids` are tombstoned and `repath` moves live images to a new path
    and metadata, keeping their ids and embeddings (what `index sync` writes).

    The records' ids are provisional: a contiguous block (any base; the builders in
    `retrieval.store.records` use one below every stored id) that is shifted to start at
    the current generation's next id; `image_id` links that point into the block shift with
    it, links to items already stored are kept.

    With `unique_paths`, an image whose path is already a live item raises
    DuplicateItemError, checked under the lock: eight concurrent uploads of the same bytes
    (stored by content hash) make one item, not eight."""
    block = [r.id for r in records]
    base = min(block, default=0)
    if sorted(block) != list(range(base, base + len(block))):
        raise IndexStoreError("provisional item ids must be one contiguous block")
    with _writer_lock(root):
        parent = open_generation(root, model.sha256, model.embed_dim)
        try:
            if unique_paths:
                _refuse_known_paths(parent, records)
            shift, end = parent.next_id - base, base + len(block)
            placed = [replace(r, id=r.id + shift, image_id=(
                r.image_id + shift if r.image_id is not None and base <= r.image_id < end
                else r.image_id)) for r in records]
            written = _derive(root, parent, model,
                              Changes(placed, vectors, delete_ids, media_roots=media_roots,
                                      repath=repath or {}), options,
                              build_info or {})
        finally:
            parent.close()
    return Appended(written.name, [r.id for r in placed], written)


def _refuse_known_paths(parent: Generation, records: Sequence[ItemRecord]) -> None:
    paths = [r.path for r in records if r.modality == "image" and r.path]
    known = parent.ids_for_paths(paths)
    if known:
        path, item_id = next(iter(known.items()))
        raise DuplicateItemError(f"{Path(path).name} is already item {item_id}", item_id)


def _derive(root: Path, parent: Generation, model: ModelIdentity, changes: Changes,
            options: StoreOptions, build_info: dict[str, Any]) -> GenerationManifest:
    add = list(changes.add)
    if any(r.id < parent.next_id for r in add):
        raise IndexStoreError(f"new item ids must be >= {parent.next_id} (the index's next id)")
    doomed = _doomed(root, parent, changes)
    vectors = changes.vectors or {}
    for stale in layout.stale_scratch(root):  # a killed writer's; we hold the lock now
        stale.unlink(missing_ok=True)
    scratch = {m: layout.scratch_rows(root, f"{parent.name}-{m}") for m in MODALITIES}
    live = {m: layout.scratch_rows(root, f"{parent.name}-{m}-live") for m in MODALITIES}
    try:
        tables = {m: _grown_table(parent, m, [r for r in add if r.modality == m],
                                  vectors.get(m), doomed, scratch[m]) for m in MODALITIES}
        roots = media.cover([*media.recorded_roots(parent.manifest), *changes.media_roots])
        return _commit_derived(root, parent, model, add, doomed, tables, changes,
                               options, build_info, live, tuple(roots))
    finally:
        for path in [*scratch.values(), *live.values()]:
            path.unlink(missing_ok=True)


def _commit_derived(root: Path, parent: Generation, model: ModelIdentity,
                    add: list[ItemRecord], doomed: set[int], tables: dict[str, Table],
                    changes: Changes, options: StoreOptions,
                    build_info: dict[str, Any], live: dict[str, Path],
                    media_roots: tuple[str, ...]) -> GenerationManifest:
    rows = sum(len(t.ids) for t in tables.values())
    dead = sum(int(t.deleted.sum()) for t in tables.values())
    on_disk = any(t.spec is not None and t.spec.kind == ann.DISK_KIND for t in tables.values())
    compact, repath = changes.compact, _checked_repath(parent, changes.repath, doomed)
    if compact is None:  # never on its own for an index on disk: compacting retrains it
        compact = rows > 0 and dead / rows > options.compact_ratio and not on_disk
    if compact:  # an on-disk table's live rows go through `live` (a scratch file)
        tables = {m: t.compacted(live[m]) for m, t in tables.items()}
    next_id = max([parent.next_id] + [r.id + 1 for r in add])

    def fill(db: sqlite3.Connection) -> None:
        _copy_database(parent.items_path, db)
        insert(db, add)
        db.executemany("UPDATE items SET path = ?, metadata = ? WHERE id = ?",
                       ((path, json.dumps(meta, default=str), i) for i, (path, meta) in repath.items()))
        db.executemany("UPDATE items SET deleted = 1 WHERE id = ?", ((i,) for i in sorted(doomed)))
        if compact:
            db.execute("DELETE FROM items WHERE deleted = 1")

    info = {**build_info, "compacted": bool(compact), "deleted_now": len(doomed)}
    # a re-pathed item's words and fields change in place: the tables are rebuilt then
    delta = None if compact or repath else ([r.id for r in add], sorted(doomed))
    plan = Plan(model, next_id, parent.name, info, options.inheriting(parent.info), delta,
                media_roots)
    return commit(root, plan, tables, fill)


def _checked_repath(parent: Generation, repath: dict[int, tuple[str, dict[str, Any]]],
                    doomed: set[int]) -> dict[int, tuple[str, dict[str, Any]]]:
    """`repath` once every id in it is a live image that is not being deleted."""
    ids = sorted(repath)
    records = parent.items(ids)
    bad = [i for i, record in zip(ids, records)
           if record is None or record.modality != "image" or i in doomed]
    if bad:
        raise UnknownItemError(f"cannot move ids {bad[:10]}: not live images in {parent.name}")
    return repath


def _doomed(root: Path, parent: Generation, changes: Changes) -> set[int]:
    """The ids to tombstone: those asked for, the images at the given paths, their captions."""
    found = parent.ids_for_paths(changes.delete_paths)
    missing = [p for p in changes.delete_paths if p not in found]
    if missing:
        raise UnknownItemError(f"no live image with path {missing[0]} in {root}")
    doomed = {int(i) for i in changes.delete_ids} | set(found.values())
    unknown = [i for i, item in zip(sorted(doomed), parent.items(sorted(doomed))) if item is None]
    if unknown:
        raise UnknownItemError(f"cannot delete ids {unknown[:10]}: not live in {parent.name}")
    return doomed | set(parent.caption_ids(doomed))


def _grown_table(parent: Generation, modality: str, new: list[ItemRecord],
                 new_vectors: np.ndarray | None, doomed: set[int], scratch: Path) -> Table:
    ids, vectors = parent.all_vectors(modality, live_only=False)
    new_ids = np.array([r.id for r in new], dtype=np.int64)
    new_matrix = _as_matrix(new_vectors, len(new), parent.embed_dim, modality)
    order = np.argsort(new_ids, kind="stable")  # ids stay ascending for searchsorted
    new_ids, new_matrix = new_ids[order], new_matrix[order]
    was_deleted = np.isin(ids, parent.tombstones(modality))
    spec = parent.index_spec(modality)
    on_disk = spec.kind == ann.DISK_KIND
    table = Table(np.concatenate([ids, new_ids]),
                  (_rows_on_disk(scratch, vectors, new_matrix) if len(new) else vectors)
                  if on_disk else np.concatenate([np.asarray(vectors), new_matrix]),
                  np.concatenate([was_deleted, np.zeros(len(new), bool)]))
    table.deleted |= np.isin(table.ids, np.fromiter(doomed, np.int64, len(doomed)))
    table.spec = spec
    if on_disk:  # its lists cannot be cloned into RAM: the commit merges the new rows in
        table.index, table.pending = parent.index(modality), (new_ids, new_matrix)
    else:
        table.index = faiss.clone_index(parent.index(modality))
        ann.add(table.index, new_matrix, new_ids)
    return table


def _rows_on_disk(path: Path, stored: np.ndarray, added: np.ndarray) -> np.ndarray:
    """`stored` (memory-mapped) then `added` rows, written to a scratch .npy a chunk at a time
    and mapped back, so growing an index larger than RAM never loads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rows(path, stored, added)
    return np.load(path, mmap_mode="r")


def _as_matrix(vectors: np.ndarray | None, count: int, dim: int, modality: str) -> np.ndarray:
    if vectors is None:
        vectors = np.zeros((0, dim), np.float32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (count, dim):
        raise IndexStoreError(f"{modality} embeddings have shape {vectors.shape}, "
                              f"expected ({count}, {dim})")
    return vectors


def _copy_database(source: Path, target: sqlite3.Connection) -> None:
    """Copy the parent's rows with SQLite's backup API (no pickling, no re-insert in Python)."""
    parent = sqlite3.connect(layout.read_only_uri(source), uri=True)
    try:
        parent.backup(target)
    finally:
        parent.close()


@contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    """One writer at a time per index directory (readers never lock)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(layout.lock_file(root), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
