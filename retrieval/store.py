"""The on-disk index format: immutable generations switched atomically by a CURRENT file.

    DIR/CURRENT                       name of the live generation ("000007")
    DIR/generations/000007/
        images.faiss  texts.faiss     IndexIDMap2 over stable item ids (tombstones included)
        images.npy    texts.npy       (rows, d) float32 embeddings, so rebuilds never re-encode
        images.ids.npy texts.ids.npy  (rows,) int64 ascending ids, row-aligned with the .npy
        items.sqlite                  one row per item: id, modality, path/text, captions, ...
        manifest.json                 model identity, counts, index specs, tuning, SHA-256s

A writer builds every file in a temp folder, fsyncs, renames the folder into place and only
then replaces CURRENT, so a reader (or a writer killed at any point) sees a whole generation.
Deletes are tombstones (filtered inside FAISS by an IDSelector); compaction drops them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from typing_extensions import Self

from retrieval import ann
from retrieval.card import sha256_file
from retrieval.errors import (
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStoreError,
    InvalidQueryError,
    UnknownItemError,
)

FORMAT = "clipdex-index/1"
MODALITIES = ("image", "text")
PLURAL = {"image": "images", "text": "texts"}
KEEP_GENERATIONS = 2
COMPACT_RATIO = 0.2  # compact automatically when more than this fraction is tombstones
MAX_TUNING_QUERIES = 1000
_SCHEMA = """
CREATE TABLE items (id INTEGER PRIMARY KEY, modality TEXT NOT NULL, path TEXT, text TEXT,
                    captions TEXT NOT NULL, metadata TEXT NOT NULL, image_id INTEGER,
                    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX items_path ON items(path);
CREATE INDEX items_image ON items(image_id);
"""


@dataclass
class ItemRecord:
    """One searchable item; caption texts point at their image through `image_id`."""

    id: int
    modality: str  # "image" or "text"
    path: str | None = None
    text: str | None = None
    captions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    image_id: int | None = None


@dataclass(frozen=True)
class ModelIdentity:
    sha256: str
    arch: str
    embed_dim: int


@dataclass(frozen=True)
class StoreOptions:
    max_memory: int | str = "4GB"
    index_kind: str | None = None  # force "flat", "hnsw" or "ivfpq"
    compact_ratio: float = COMPACT_RATIO


def model_fingerprint(clip: Any) -> str:
    """The checkpoint's SHA-256 when it has a card; else a hash of arch, init and weights,
    so two random-weight models never pass for one another."""
    if clip.card.get("sha256"):
        return str(clip.card["sha256"])
    import torch

    digest = hashlib.sha256(json.dumps({"arch": clip.arch, "init": clip.init}).encode())
    for name, tensor in sorted(clip.model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def model_identity(clip: Any) -> ModelIdentity:
    return ModelIdentity(model_fingerprint(clip), clip.arch, int(clip.embed_dim))


def maybe_fault(point: str, number: int | None = None) -> None:
    """Test hook: CLIPDEX_FAULT=point[:n] kills this process with SIGKILL there, and
    CLIPDEX_FAULT=stall:point[:n] sleeps so a test can kill it from outside."""
    wanted = os.environ.get("CLIPDEX_FAULT", "")
    stall = wanted.startswith("stall:")
    if wanted.removeprefix("stall:") != (point if number is None else f"{point}:{number}"):
        return
    if stall:
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- reading


class Generation:
    """A verified, read-only generation; safe to search from several threads."""

    def __init__(self, root: Path, name: str, manifest: dict[str, Any],
                 indexes: dict[str, faiss.Index], ids: dict[str, np.ndarray],
                 vectors: dict[str, np.ndarray], db: sqlite3.Connection):
        self.root, self.name, self.manifest = root, name, manifest
        self.embed_dim = int(manifest["embed_dim"])
        self.model_sha256 = str(manifest["model"]["sha256"])
        self._indexes, self._ids, self._vectors, self._db = indexes, ids, vectors, db
        self._lock = threading.Lock()
        self._deleted = {m: self._tombstones(m) for m in MODALITIES}
        self._selectors: dict[str, Any] = {}
        self._params = {m: self._search_params(m) for m in MODALITIES}

    @property
    def path(self) -> Path:
        return self.root / "generations" / self.name

    @property
    def next_id(self) -> int:
        return int(self.manifest["next_id"])

    def count(self, modality: str) -> int:
        """Live (not deleted) items of one modality."""
        return int(self._section(modality)["live"])

    def search(self, modality: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, d) unit queries -> (scores, ids), each (nq, min(k, live)); never a -1 id."""
        queries = self._check_queries(queries)
        width = min(max(int(k), 0), self.count(modality))
        if width == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self._indexes[modality].search(queries, width, params=self._params[modality])
        short = np.flatnonzero((ids < 0).any(axis=1))
        if len(short):  # IVF with few probes can come back short: answer those rows exactly
            scores[short], ids[short] = self._exact(modality, queries[short], width)
        return scores.astype(np.float32), ids.astype(np.int64)

    def items(self, ids: Sequence[int]) -> list[ItemRecord | None]:
        """Records in the order asked; None for an id that is unknown or deleted."""
        wanted = [int(i) for i in ids]
        found: dict[int, ItemRecord] = {}
        for start in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
            part = wanted[start:start + 900]
            marks = ",".join("?" * len(part))
            for row in self._query(f"SELECT id, modality, path, text, captions, metadata, image_id"
                                   f" FROM items WHERE deleted = 0 AND id IN ({marks})", part):
                found[row[0]] = _record(row)
        return [found.get(i) for i in wanted]

    def ids_for_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """Live image ids by stored path (the indexer stores resolved absolute paths)."""
        result = {}
        for path in paths:
            rows = self._query("SELECT id FROM items WHERE deleted = 0 AND path = ?", [str(path)])
            if rows:
                result[str(path)] = int(rows[0][0])
        return result

    def ids_for_texts(self, texts: Iterable[str]) -> dict[str, int]:
        """Live free texts (not captions) by exact content, so re-adding a corpus is a no-op."""
        result = {}
        for text in texts:
            rows = self._query("SELECT id FROM items WHERE deleted = 0 AND modality = 'text' "
                               "AND image_id IS NULL AND text = ?", [text])
            if rows:
                result[text] = int(rows[0][0])
        return result

    def caption_ids(self, image_ids: Iterable[int]) -> list[int]:
        """Live caption texts that belong to the given images."""
        out = []
        for image_id in image_ids:
            out += [r[0] for r in self._query("SELECT id FROM items WHERE deleted = 0 AND "
                                              "image_id = ?", [int(image_id)])]
        return out

    def vectors(self, modality: str, ids: Sequence[int]) -> np.ndarray:
        """Stored (len(ids), d) embeddings of live items (image->image search by id)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        known = self._ids[self._modality(modality)]
        rows = np.zeros(len(ids), np.int64)
        ok = np.zeros(len(ids), bool)
        if len(known):
            rows = np.searchsorted(known, ids).clip(0, len(known) - 1)
            ok = (known[rows] == ids) & ~np.isin(ids, self._deleted[modality])
        if not ok.all():
            raise UnknownItemError(f"no live {modality} items with ids {ids[~ok][:10].tolist()}")
        return np.asarray(self._vectors[modality][rows], dtype=np.float32)

    def all_vectors(self, modality: str, live_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), vectors (n, d)) of a modality, e.g. to rebuild or export."""
        ids, vectors = self._ids[modality], self._vectors[modality]
        if not live_only:
            return ids, vectors
        keep = ~np.isin(ids, self._deleted[modality])
        return ids[keep], np.asarray(vectors[keep])

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._indexes, self._params, self._selectors = {}, {}, {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _section(self, modality: str) -> dict[str, Any]:
        return self.manifest["modalities"][self._modality(modality)]

    @staticmethod
    def _modality(modality: str) -> str:
        if modality not in MODALITIES:
            raise InvalidQueryError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return modality

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise InvalidQueryError(f"queries must be (n, {self.embed_dim}) float32, "
                                    f"got shape {queries.shape}")
        return queries

    def _query(self, sql: str, args: Sequence[Any]) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, list(args)).fetchall()

    def _tombstones(self, modality: str) -> np.ndarray:
        rows = self._query("SELECT id FROM items WHERE deleted = 1 AND modality = ?", [modality])
        return np.array(sorted(r[0] for r in rows), dtype=np.int64)

    def _search_params(self, modality: str) -> Any:
        spec = self._section(modality)["index"]
        selector = None
        if len(self._deleted[modality]):
            batch = faiss.IDSelectorBatch(self._deleted[modality])
            selector = faiss.IDSelectorNot(batch)
            self._selectors[modality] = (batch, selector)  # keep the C++ objects alive
        return ann.search_parameters(spec["kind"], spec["params"], selector)

    def _exact(self, modality: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, vectors = self.all_vectors(modality)
        scores = queries @ vectors.T  # (nq, live)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, axis=1), ids[top]


def _record(row: tuple) -> ItemRecord:
    return ItemRecord(id=row[0], modality=row[1], path=row[2], text=row[3],
                      captions=json.loads(row[4]), metadata=json.loads(row[5]), image_id=row[6])


def current_name(root: Path) -> str:
    pointer = Path(root) / "CURRENT"
    if not pointer.is_file():
        raise IndexNotFoundError(f"{root} is not a clipdex index (no CURRENT file); "
                                 "build one with `clipdex index build`")
    return pointer.read_text().strip()


def open_generation(root: Path, model_sha256: str | None = None, embed_dim: int | None = None,
                    name: str | None = None, verify_checksums: bool = True) -> Generation:
    """Open the CURRENT (or the named) generation after checking it is whole and fits the model."""
    root = Path(root)
    name = name or current_name(root)
    folder = root / "generations" / name
    manifest = _read_manifest(folder)
    _check_model(manifest, model_sha256, embed_dim)
    if verify_checksums:
        _check_files(folder, manifest)
    indexes, ids, vectors = {}, {}, {}
    for modality in MODALITIES:
        indexes[modality], ids[modality], vectors[modality] = _load_modality(folder, manifest,
                                                                             modality)
    db = sqlite3.connect(f"{(folder / 'items.sqlite').resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                         check_same_thread=False)
    generation = Generation(root, name, manifest, indexes, ids, vectors, db)
    _check_rows(generation)
    return generation


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise IndexCorruptError(f"{path} is missing; the generation is incomplete")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise IndexCorruptError(f"{path}: not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def _check_model(manifest: dict[str, Any], model_sha256: str | None,
                 embed_dim: int | None) -> None:
    built = manifest["model"]
    if model_sha256 is not None and model_sha256 != built["sha256"]:
        raise IndexMismatchError(
            f"index was built with model sha256 {built['sha256'][:16]}… ({built['arch']}), "
            f"you loaded {model_sha256[:16]}…; rebuild the index or load the same model")
    if embed_dim is not None and int(embed_dim) != int(manifest["embed_dim"]):
        raise IndexMismatchError(f"index has embed_dim {manifest['embed_dim']}, "
                                 f"the model gives {embed_dim}")


def _check_files(folder: Path, manifest: dict[str, Any]) -> None:
    for filename, expected in manifest["files"].items():
        path = folder / filename
        if not path.is_file():
            raise IndexCorruptError(f"{path} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise IndexCorruptError(f"{path}: SHA-256 {actual[:12]}… differs from the "
                                    f"manifest's {expected[:12]}…; the file was changed")


def _load_modality(folder: Path, manifest: dict[str, Any],
                   modality: str) -> tuple[faiss.Index, np.ndarray, np.ndarray]:
    plural, section = PLURAL[modality], manifest["modalities"][modality]
    try:
        index = faiss.read_index(str(folder / f"{plural}.faiss"))
        ids = np.load(folder / f"{plural}.ids.npy")
        vectors = np.load(folder / f"{plural}.npy", mmap_mode="r")
    except (RuntimeError, OSError, ValueError) as error:
        raise IndexCorruptError(f"{folder}/{plural}: unreadable ({error})") from None
    rows, dim = int(section["rows"]), int(manifest["embed_dim"])
    problems = [f"{plural}.faiss holds {index.ntotal} vectors" if index.ntotal != rows else "",
                f"{plural}.faiss has dimension {index.d}" if index.d != dim else "",
                f"{plural}.npy has shape {vectors.shape}" if vectors.shape != (rows, dim) else "",
                f"{plural}.ids.npy has {len(ids)} ids" if len(ids) != rows else ""]
    problems = [p for p in problems if p]
    if problems:
        raise IndexCorruptError(f"{folder}: {'; '.join(problems)}, manifest says {rows} x {dim}")
    ann.apply_params(index, section["index"]["params"])
    return index, ids, vectors


def _check_rows(generation: Generation) -> None:
    for modality in MODALITIES:
        section = generation.manifest["modalities"][modality]
        rows = generation._query("SELECT COUNT(*), COALESCE(SUM(deleted), 0) FROM items "
                                 "WHERE modality = ?", [modality])[0]
        if (rows[0], rows[0] - rows[1]) != (section["rows"], section["live"]):
            generation.close()
            raise IndexCorruptError(
                f"{generation.path}/items.sqlite has {rows[0]} {modality} rows ({rows[1]} "
                f"deleted), the manifest says {section['rows']} ({section['live']} live)")


# ----------------------------------------------------------------------------- writing


@dataclass
class _Table:
    """One modality being written: row-aligned ids (n,), vectors (n, d), tombstones (n,)."""

    ids: np.ndarray
    vectors: np.ndarray
    deleted: np.ndarray
    index: faiss.Index | None = None  # reused from the parent generation when still right
    spec: ann.IndexSpec | None = None


def write_generation(root: Path, model: ModelIdentity, records: Sequence[ItemRecord],
                     vectors: dict[str, np.ndarray], options: StoreOptions = StoreOptions(),
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
                      delete_ids: Iterable[int] = (), options: StoreOptions = StoreOptions(),
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
