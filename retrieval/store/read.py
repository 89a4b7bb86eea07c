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

import hashlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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
    """Test hook: CLIPDEX_FAULT=point[:n] kills this process with SIGKILL there,
    CLIPDEX_FAULT=stall:point[:n] sleeps so a test can kill it from outside, and
    CLIPDEX_FAULT=pause:point[:n] stops it (SIGSTOP) until a test sends SIGCONT."""
    wanted = os.environ.get("CLIPDEX_FAULT", "")
    mode, _, target = wanted.partition(":")
    if mode not in ("stall", "pause"):
        mode, target = "kill", wanted
    if target != (point if number is None else f"{point}:{number}"):
        return
    if mode == "stall":
        time.sleep(600)
    elif mode == "pause":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
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
        params = self._section(modality)["index"]["params"]
        lookup = ann.sorted_lookup(self._ids[modality], self._vectors[modality])
        scores, ids = ann.search(self._indexes[modality], queries, width, params, lookup,
                                 self._params[modality])
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
    try:
        generation = Generation(root, name, manifest, indexes, ids, vectors, db)
    except sqlite3.DatabaseError as error:  # reached when checksums were not verified
        db.close()
        raise IndexCorruptError(f"{folder}/items.sqlite: unreadable ({error})") from None
    _check_rows(generation)
    return generation


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise IndexCorruptError(f"{path} is missing; the generation is incomplete")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError from a damaged byte
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
    path = folder / f"{plural}.faiss"
    try:  # `path` names the file that failed
        index = faiss.read_index(str(path))
        path = folder / f"{plural}.ids.npy"
        ids = np.load(path)
        path = folder / f"{plural}.npy"
        vectors = np.load(path, mmap_mode="r")
    except (RuntimeError, OSError, ValueError) as error:
        raise IndexCorruptError(f"{path}: unreadable ({error})") from None
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
