"""Reading a generation: `open_generation` checks that it is whole (manifest, SHA-256s,
counts) and fits the model, then `Generation` answers searches and item lookups.

The files are named in `retrieval.store.layout`; a generation never changes once CURRENT has
named it, so readers take no lock: each thread reads the items table through its own
connection, every statement under a time limit (`retrieval.store.readers`). Deletes are
tombstones (filtered inside FAISS by an IDSelector); compaction drops them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from typing_extensions import Self

from retrieval.ann import engines as ann
from retrieval.ann import ondisk
from retrieval.ann.rowscan import gather_rows, rows_of
from retrieval.errors import (
    IndexCorruptError,
    IndexStoreError,
    InvalidQueryError,
    UnknownItemError,
)
from retrieval.fields.filters import Filter
from retrieval.models.choices import MODALITIES
from retrieval.store import fields, keywords, layout, manifest, media, reduced
from retrieval.store.filtered import Stored, exact_within, search_within
from retrieval.store.manifest import GenerationManifest
from retrieval.store.readers import QUERY_SECONDS, Readers
from retrieval.store.records import COLUMNS, ItemRecord, from_row
from retrieval.store.reduced import Reduced

SQLITE_MAX_PARAMS = 900  # bound parameters per statement, under SQLite's limit
MATCH_CACHE = 16  # filters whose matching ids a generation remembers (paging repeats them)


class Generation:
    """A verified, read-only generation; safe to search from several threads."""

    def __init__(self, root: Path, info: GenerationManifest, indexes: dict[str, faiss.Index],
                 ids: dict[str, np.ndarray], vectors: dict[str, np.ndarray],
                 copies: dict[str, Reduced | None], readers: Readers):
        self.root, self.info, self.name = root, info, info.name
        self.manifest = info.data  # the manifest.json object
        self.embed_dim = info.embed_dim
        self.model_sha256 = info.model.sha256
        self._indexes, self._ids, self._vectors = indexes, ids, vectors
        self._readers = readers
        self._lock = threading.Lock()  # guards the cache of matches
        self._deleted = {m: self._tombstones(m) for m in MODALITIES}
        # the tombstone selectors, built once; SearchParameters are made per search, because
        # IndexIDMap's search swaps their `sel` for a moment (two threads must not share one)
        self._selectors = {m: self._selector(m) for m in MODALITIES}
        self._reduced = copies  # HNSW generations' reduced vectors, for filtered searches
        self._matches: OrderedDict[tuple[str, Filter], np.ndarray] = OrderedDict()

    @property
    def path(self) -> Path:
        """The generation's folder."""
        return layout.generation_dir(self.root, self.name)

    @property
    def items_path(self) -> Path:
        """Its items table (a writer copies it into the next generation)."""
        return layout.items_file(self.path)

    @property
    def media_roots(self) -> list[str]:
        """The folders whose files this generation may serve (`store.media`)."""
        return media.recorded_roots(self.manifest)

    def image_file(self, stored: str | None) -> tuple[Path, str] | None:
        """(file, media type) of an item's stored path when it may be served: under a media
        root once links and `..` are resolved, and an image by its header; else None."""
        return media.servable(self.root, stored, self.media_roots)

    @property
    def next_id(self) -> int:
        return self.info.next_id

    def count(self, modality: str) -> int:
        """Live (not deleted) items of one modality."""
        return int(self._section(modality)["live"])

    def fields(self) -> dict[str, str]:
        """The filterable metadata fields and their types ({} for an older generation)."""
        return self.info.fields()

    def matching_ids(self, modality: str, where: Filter) -> np.ndarray:
        """(m,) ascending ids of the live items of `modality` that a checked filter matches
        (remembered for the last MATCH_CACHE filters: the generation never changes)."""
        key = (self._modality(modality), where)
        with self._lock:
            if key in self._matches:
                self._matches.move_to_end(key)
                return self._matches[key]
        sql, params = fields.matching_sql(modality, where)
        ids = np.array([row[0] for row in self._query(sql, params)], dtype=np.int64)
        ids.setflags(write=False)  # shared by every search that repeats this filter
        with self._lock:
            self._matches[key] = ids
            while len(self._matches) > MATCH_CACHE:
                self._matches.popitem(last=False)
        return ids

    def listing(self, modality: str, where: Filter | None, order: tuple[str, str] | None,
                descending: bool, offset: int, limit: int) -> list[int]:
        """One page of the live ids a filter matches, by id or by a field (`fields.listing_sql`)."""
        sql, params = fields.listing_sql(self._modality(modality), where, order, descending)
        return self._readers.take(sql, params, lambda rows: fields.first_distinct(
            rows, int(offset), int(limit)))

    def keyword(self, modality: str, text: str, where: Filter | None,
                limit: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (m,), BM25 scores (m,)) of the live items of `modality` whose words match
        `text` (any word), best first, among those a checked filter matches."""
        if not self.info.has_keywords:
            raise InvalidQueryError(f"generation {self.name} was built before keyword search "
                                    "existed; rebuild the index, or search in vector mode")
        sql, params = keywords.keyword_sql(self._modality(modality),
                                           keywords.match_expression(text), where, limit)
        rows = self._query(sql, params)
        return (np.array([r[0] for r in rows], dtype=np.int64),
                np.array([r[1] for r in rows], dtype=np.float64))

    def search(self, modality: str, queries: np.ndarray, k: int,
               within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(nq, d) unit queries -> (scores, ids), each (nq, min(k, live)); never a -1 id.
        With `within` (ascending live ids, e.g. `matching_ids`), only those are searched and
        each query gets min(k, len(within)) hits."""
        queries = self._check_queries(queries)
        if within is not None:
            return search_within(self._stored(modality), queries, k, within)
        width = min(max(int(k), 0), self.count(modality))
        if width == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = self._section(modality)["index"]["params"]
        lookup = ann.sorted_lookup(self._ids[modality], self._vectors[modality])
        selector = self._selectors[modality]
        search_params = ann.search_parameters(self._section(modality)["index"]["kind"], params,
                                              selector[1] if selector else None)
        scores, ids = ann.search(self._indexes[modality], queries, width, params, lookup,
                                 search_params)
        short = np.flatnonzero((ids < 0).any(axis=1))
        if len(short):  # IVF with few probes can come back short: answer those rows exactly
            scores[short], ids[short] = self._exact(modality, queries[short], width)
        return scores.astype(np.float32), ids.astype(np.int64)

    def items(self, ids: Sequence[int]) -> list[ItemRecord | None]:
        """Records in the order asked; None for an id that is unknown or deleted."""
        wanted = [int(i) for i in ids]
        found: dict[int, ItemRecord] = {}
        for start in range(0, len(wanted), SQLITE_MAX_PARAMS):
            part = wanted[start:start + SQLITE_MAX_PARAMS]
            marks = ",".join("?" * len(part))
            for row in self._query(f"SELECT {COLUMNS} FROM items WHERE deleted = 0 "
                                   f"AND id IN ({marks})", part):
                found[row[0]] = from_row(row)
        return [found.get(i) for i in wanted]

    def ids_for_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """Live image ids by stored path (the indexer stores resolved absolute paths)."""
        result = {}
        for path in paths:
            rows = self._query("SELECT id FROM items WHERE deleted = 0 AND path = ?", [str(path)])
            if rows:
                result[str(path)] = int(rows[0][0])
        return result

    def image_files(self, folder: str) -> list[tuple[int, str, dict[str, Any]]]:
        """(id, path, metadata) of the live images stored under `folder` (a resolved path),
        in path order: what a sync compares with the folder (a range scan of the path index)."""
        low = folder.rstrip("/") + "/"
        rows = self._query("SELECT id, path, metadata FROM items WHERE deleted = 0 AND "
                           "modality = 'image' AND path >= ? AND path < ? ORDER BY path",
                           [low, low[:-1] + "0"])  # "0" is the character after "/"
        return [(int(i), str(path), json.loads(metadata)) for i, path, metadata in rows]

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
            rows = rows_of(known, ids)
            ok = (known[rows] == ids) & ~np.isin(ids, self._deleted[modality])
        if not ok.all():
            raise UnknownItemError(f"no live {modality} items with ids {ids[~ok][:10].tolist()}")
        return gather_rows(self._vectors[modality], rows)

    def all_vectors(self, modality: str, live_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), vectors (n, d)) of a modality, e.g. to rebuild or export."""
        ids, vectors = self._ids[modality], self._vectors[modality]
        if not live_only:
            return ids, vectors
        keep = ~np.isin(ids, self._deleted[modality])
        return ids[keep], np.asarray(vectors[keep])

    def tombstones(self, modality: str) -> np.ndarray:
        """(n,) int64 ascending ids of the deleted items still stored in a modality."""
        return self._deleted[self._modality(modality)]

    def index(self, modality: str) -> faiss.Index:
        """A modality's FAISS index as loaded (shared by searches: clone it to change it)."""
        return self._indexes[self._modality(modality)]

    def index_spec(self, modality: str) -> ann.IndexSpec:
        """The kind and search parameters the index was committed with."""
        return ann.IndexSpec(**self._section(modality)["index"])

    def close(self) -> None:
        """Release the generation; a statement still running on it stops at once (its caller
        gets QueryTimeoutError), so closing never waits for a slow query."""
        self._readers.close()
        self._indexes, self._selectors, self._vectors = {}, {}, {}  # unmaps the files
        self._reduced = {}
        self._matches.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stored(self, modality: str) -> Stored:
        spec = self._section(modality)["index"]
        return Stored(self._indexes[modality], spec["kind"], spec["params"], self._ids[modality],
                      self._vectors[modality], self.count(modality), self._reduced[modality])

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
        return self._readers.rows(sql, args)

    def _tombstones(self, modality: str) -> np.ndarray:
        rows = self._query("SELECT id FROM items WHERE deleted = 1 AND modality = ?", [modality])
        return np.array(sorted(r[0] for r in rows), dtype=np.int64)

    def _selector(self, modality: str) -> tuple[Any, Any] | None:
        """(batch, its negation): the ids not deleted; both kept so the C++ objects live."""
        if not len(self._deleted[modality]):
            return None
        batch = faiss.IDSelectorBatch(self._deleted[modality])
        return batch, faiss.IDSelectorNot(batch)

    def _exact(self, modality: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-k among live rows, scanned a block of stored rows at a time (the
        vectors may be a memory-mapped corpus larger than RAM)."""
        ids = self._ids[modality]
        live = ids[~np.isin(ids, self._deleted[modality])]
        return exact_within(self._stored(modality), queries, k, live)


def verify_generation(root: Path, name: str | None = None) -> GenerationManifest:
    """Re-read every file of the CURRENT (or the named) generation against the SHA-256 it was
    written with, however large (`open_generation` hashes only files up to
    manifest.HASH_ON_OPEN_BYTES and checks the sizes of the rest); IndexCorruptError names
    the first file that fails. Returns the manifest that was checked."""
    root = Path(root)
    name = name or layout.current_name(root)
    folder = layout.generation_dir(root, name)
    info = GenerationManifest(name, manifest.load(folder))
    manifest.check_files(folder, info.data, full=True)
    return info


def open_generation(root: Path, model_sha256: str | None = None, embed_dim: int | None = None,
                    name: str | None = None, verify_checksums: bool = True,
                    query_seconds: float = QUERY_SECONDS) -> Generation:
    """Open the CURRENT (or the named) generation after checking it is whole and fits the model;
    each statement on its items table may run `query_seconds`."""
    root = Path(root)
    name = name or layout.current_name(root)
    folder = layout.generation_dir(root, name)
    info = GenerationManifest(name, manifest.load(folder))
    manifest.check_model(info.data, model_sha256, embed_dim)
    if verify_checksums:
        manifest.check_files(folder, info.data)
    indexes, ids, vectors, copies = {}, {}, {}, {}
    for modality in MODALITIES:
        (indexes[modality], ids[modality], vectors[modality],
         copies[modality]) = _load_modality(folder, info, modality)
    path = layout.items_file(folder)
    readers = Readers(path, query_seconds)
    try:
        generation = Generation(root, info, indexes, ids, vectors, copies, readers)
    except sqlite3.DatabaseError as error:  # reached when checksums were not verified
        readers.close()
        raise IndexCorruptError(f"{path}: unreadable ({error})") from None
    _check_rows(generation)
    return generation


def _load_modality(folder: Path, info: GenerationManifest, modality: str
                   ) -> tuple[faiss.Index, np.ndarray, np.ndarray, Reduced | None]:
    files, section = layout.modality_files(folder, modality), info.section(modality)
    path = files.index
    try:  # `path` names the file that failed
        on_disk = section["index"]["kind"] == ann.DISK_KIND
        index = (ondisk.load(ondisk.DiskFiles(path, files.lists)) if on_disk
                 else faiss.read_index(str(path)))
        path = files.ids
        ids = np.load(path)
        path = files.vectors
        vectors = np.load(path, mmap_mode="r")
        path = files.reduced
        copy = reduced.load((files.projection, files.reduced), section.get("reduced"))
    except (RuntimeError, OSError, ValueError, IndexStoreError) as error:
        raise IndexCorruptError(f"{path}: unreadable ({error})") from None
    rows, dim = int(section["rows"]), info.embed_dim
    problems = [f"{files.index.name} holds {index.ntotal} vectors" if index.ntotal != rows else "",
                f"{files.index.name} has dimension {index.d}" if index.d != dim else "",
                f"{files.vectors.name} has shape {vectors.shape}"
                if vectors.shape != (rows, dim) else "",
                f"{files.ids.name} has {len(ids)} ids" if len(ids) != rows else "",
                f"{files.reduced.name} has {len(copy.rows)} rows"
                if copy is not None and len(copy.rows) != rows else ""]
    problems = [p for p in problems if p]
    if problems:
        raise IndexCorruptError(f"{folder}: {'; '.join(problems)}, manifest says {rows} x {dim}")
    ann.apply_params(index, section["index"]["params"])
    return index, ids, vectors, copy


def _check_rows(generation: Generation) -> None:
    for modality in MODALITIES:
        section = generation.info.section(modality)
        rows = generation._query("SELECT COUNT(*), COALESCE(SUM(deleted), 0) FROM items "
                                 "WHERE modality = ?", [modality])[0]
        if (rows[0], rows[0] - rows[1]) != (section["rows"], section["live"]):
            generation.close()
            raise IndexCorruptError(
                f"{generation.items_path} has {rows[0]} {modality} rows ({rows[1]} "
                f"deleted), the manifest says {section['rows']} ({section['live']} live)")
