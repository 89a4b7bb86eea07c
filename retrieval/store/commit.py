"""Committing one generation: build every file in a temp folder, fsync, rename the folder into
place, and only then replace CURRENT, so a reader (or a writer killed at any point) sees a
whole generation. The caller holds the writer lock (`retrieval.store.write`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.ann import engines as ann
from retrieval.ann import ondisk, tuning
from retrieval.ann.rowscan import RowWriter, gather_rows, row_chunks
from retrieval.atomic import fsync_path
from retrieval.digest import sha256_file
from retrieval.errors import IndexStoreError
from retrieval.models.choices import MODALITIES
from retrieval.models.identity import ModelIdentity
from retrieval.store import fields, keywords, layout, manifest, reduced
from retrieval.store.faults import fault_point
from retrieval.store.layout import PLURAL
from retrieval.store.manifest import GenerationManifest

KEEP_GENERATIONS = 2
COMPACT_RATIO = 0.2  # compact automatically when more than this fraction is tombstones
MAX_TUNING_QUERIES = 1000
Fill = Callable[[sqlite3.Connection], None]  # writes the new items table's rows


@dataclass(frozen=True)
class StoreOptions:
    max_memory: int | str = "4GB"
    index_kind: str | None = None  # force "flat", "hnsw", "ivfpq" or "ivfpq-disk"
    compact_ratio: float = COMPACT_RATIO
    # recall@10 against exact search that the search settings are tuned to reach: a lower
    # target probes fewer lists (faster queries); see retrieval.ann.tuning. None: the parent
    # generation's target (an `index add` keeps what the build chose), else TARGET_RECALL
    target_recall: float | None = None
    # who fills an on-disk index's blocks: this process, or Ray tasks (`--engine ray`)
    fill_blocks: ondisk.BlockFiller = ondisk.fill_here

    def inheriting(self, parent: GenerationManifest) -> StoreOptions:
        """These options with the parent's recall target when none was given."""
        if self.target_recall is not None:
            return self
        targets = [section.get("tuning", {}).get("target")
                   for section in parent.data["modalities"].values()]
        recorded = next((float(t) for t in targets if t is not None), None)
        return replace(self, target_recall=recorded)


@dataclass
class Table:
    """One modality being written: row-aligned ids (n,), vectors (n, d), tombstones (n,)."""

    ids: np.ndarray
    vectors: np.ndarray
    deleted: np.ndarray
    index: faiss.Index | None = None  # reused from the parent generation when still right
    spec: ann.IndexSpec | None = None
    # rows (ids (m,), vectors (m, d)) not yet in `index`: an on-disk index cannot be cloned
    # and grown in RAM, so its new rows are merged in when the generation is written
    pending: tuple[np.ndarray, np.ndarray] | None = None

    def compacted(self, scratch: Path) -> Table:
        """The live rows only, to be indexed anew; an on-disk index's spec is kept, so the
        rebuilt index stays on disk, and its live rows are copied a chunk at a time into
        `scratch` (mapped back) instead of gathered in RAM."""
        keep = ~self.deleted
        if self.spec is None or self.spec.kind != ann.DISK_KIND:
            return Table(self.ids[keep], np.asarray(self.vectors)[keep], self.deleted[keep])
        with RowWriter(scratch, self.vectors.shape[1], int(keep.sum())) as out:
            for start, part in row_chunks(self.vectors):
                out.write(part[keep[start:start + len(part)]])
        return Table(self.ids[keep], out.rows(), self.deleted[keep], spec=self.spec)


@dataclass(frozen=True)
class Plan:
    """What the next generation holds, beyond its tables and rows."""

    model: ModelIdentity
    next_id: int
    parent: str | None
    build_info: dict[str, Any]
    options: StoreOptions
    # (ids added, ids deleted) when the items table is the parent's plus these changes, so
    # the field and keyword tables are updated; None: they are built from scratch
    changes: tuple[list[int], list[int]] | None = None
    media_roots: tuple[str, ...] = ()  # the folders whose files it may serve (`store.media`)


def commit(root: Path, plan: Plan, tables: dict[str, Table], fill: Fill) -> GenerationManifest:
    """Write and switch to a new generation; returns the manifest it wrote. On a failure
    CURRENT still names the previous generation and nothing of the new one is left."""
    root = Path(root)
    generations = layout.generations_dir(root)
    generations.mkdir(parents=True, exist_ok=True)
    name = f"{_last_number(generations) + 1:06d}"
    temp = generations / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        data = _write_files(temp, name, plan, tables, fill)
        _switch(root, temp, name)
        return GenerationManifest(name, data)
    # FAISS reports a failed write as RuntimeError and SQLite as sqlite3.Error, not OSError;
    # whatever failed, nothing of the new generation may stay behind
    except BaseException as error:
        full = (isinstance(error, (OSError, RuntimeError, sqlite3.Error))
                and _is_disk_full(error, generations))
        shutil.rmtree(temp, ignore_errors=True)
        layout.current_temp_file(root).unlink(missing_ok=True)
        if layout.current_file(root).is_file() and layout.read_current(root) != name:
            shutil.rmtree(layout.generation_dir(root, name), ignore_errors=True)
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


def _write_files(temp: Path, name: str, plan: Plan, tables: dict[str, Table],
                 fill: Fill) -> dict[str, Any]:
    """Every file of the generation into `temp`, the manifest last, all fsynced."""
    temp.mkdir()
    sections = _write_tables(temp, tables, plan.options)
    db = sqlite3.connect(layout.items_file(temp))
    with db:
        fill(db)
        if plan.changes is None:
            field_types = fields.build(db)
            keywords.build(db)
        else:
            field_types = fields.update(db, *plan.changes)
            keywords.update(db, plan.changes[0])
    db.close()
    fault_point("mid_generation")
    files = sorted(p for p in temp.iterdir() if p.is_file())
    data = manifest.new(plan.model, sections, plan.next_id, name, plan.parent, plan.build_info,
                        {p.name: sha256_file(p) for p in files},
                        {p.name: p.stat().st_size for p in files}, field_types,
                        {"index": "fts5"}, plan.media_roots)
    data = manifest.sealed(data)
    layout.manifest_file(temp).write_text(json.dumps(data, indent=2) + "\n")
    for path in temp.iterdir():
        fsync_path(path)
    fsync_path(temp)
    return data


def _switch(root: Path, temp: Path, name: str) -> None:
    """Rename the finished folder into place, then point CURRENT at it (atomically)."""
    generations = layout.generations_dir(root)
    os.rename(temp, layout.generation_dir(root, name))
    fsync_path(generations)
    fault_point("before_current")
    previous = layout.read_current(root)  # kept by the prune (a garbled one matches nothing)
    pointer = layout.current_temp_file(root)
    pointer.write_text(name + "\n")
    fsync_path(pointer)
    os.replace(pointer, layout.current_file(root))
    fsync_path(root)
    _prune(generations, keep={name, previous})


def _write_tables(folder: Path, tables: dict[str, Table],
                  options: StoreOptions) -> dict[str, dict[str, Any]]:
    sections = {}
    for modality, table in tables.items():
        other_modality = MODALITIES[1 - MODALITIES.index(modality)]
        other = tables[other_modality]
        live = np.flatnonzero(~other.deleted)  # sample rows first: the vectors may be mapped
        if len(live) > MAX_TUNING_QUERIES:
            rows = np.random.default_rng(0).choice(len(live), MAX_TUNING_QUERIES, False)
            live = live[np.sort(rows)]
        queries = gather_rows(other.vectors, live)  # never fancy-index a mapped file
        files = layout.modality_files(folder, modality)
        index, spec = _index_for(table, options, ondisk.DiskFiles(files.index, files.lists))
        spec, report = tuning.tune(index, spec, table.vectors, table.ids, queries,
                                   query_source=PLURAL[other_modality],
                                   target=options.target_recall or tuning.TARGET_RECALL)
        if spec.kind != ann.DISK_KIND:  # an on-disk index wrote its own files
            faiss.write_index(index, str(files.index))
        save_rows(files.vectors, table.vectors)
        np.save(files.ids, table.ids)
        sections[modality] = {"rows": len(table.ids), "live": int((~table.deleted).sum()),
                              "deleted": int(table.deleted.sum()), "index": spec.as_dict(),
                              "tuning": report}
        spare = ann.parse_memory(options.max_memory) - spec.memory_bytes
        copy = reduced.build(table.vectors, np.flatnonzero(~table.deleted), queries,
                             spec.kind, (files.projection, files.reduced), spare)
        if copy is not None:
            sections[modality]["reduced"] = copy
        if spec.kind == ann.DISK_KIND:
            sections[modality]["lists_file"] = files.lists.name
    return sections


def _index_for(table: Table, options: StoreOptions,
               files: ondisk.DiskFiles) -> tuple[faiss.Index, ann.IndexSpec]:
    """Reuse the parent's index when the size rule still picks its kind; else build anew.
    An on-disk index is written to `files` as it is built (or extended)."""
    dim = table.vectors.shape[1]
    # an index moved to disk for its size stays there unless another kind is forced
    kind = options.index_kind or (ann.DISK_KIND if table.spec is not None
                                  and table.spec.kind == ann.DISK_KIND else None)
    wanted = ann.choose_index(len(table.ids), dim, options.max_memory, kind)
    reuse = table.index is not None and table.spec is not None and table.spec.kind == wanted.kind
    if wanted.kind != ann.DISK_KIND:
        if reuse and table.pending is None:
            return table.index, table.spec
        return ann.build_index(wanted, table.vectors, table.ids), wanted
    if reuse:  # the parent's lists are copied list by list, the new rows merged in
        ids, vectors = table.pending or (np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
        return ondisk.extend(table.index, vectors, ids, files, options.fill_blocks), table.spec
    # build anew (no parent index, or compaction dropped it): its files go into `folder`
    return ondisk.build(wanted.factory, table.vectors, table.ids, files,
                        ann.disk_training(len(table.ids), wanted), fill=options.fill_blocks), wanted


def save_rows(path: Path, *parts: np.ndarray, chunk: int = 1 << 16) -> None:
    """np.save of the parts' (n_i, d) rows one after another, a chunk at a time, so
    memory-mapped rows are never loaded whole (nor kept mapped: `retrieval.ann.rowscan`)."""
    dim = next((part.shape[1] for part in parts if part.ndim == 2), 0)
    with RowWriter(path, dim, sum(len(part) for part in parts)) as out:
        for rows in parts:
            for _, part in row_chunks(rows, chunk):
                out.write(part)


def _last_number(generations: Path) -> int:
    numbers = [int(p.name) for p in generations.iterdir() if p.name.isdigit()]
    return max(numbers, default=0)


def _prune(generations: Path, keep: set[str | None]) -> None:
    """Keep the new generation and the one it replaced (KEEP_GENERATIONS = 2); drop older
    ones and whatever writers killed mid-way left behind (temp folders, never-current ones)."""
    for path in generations.iterdir():
        if path.name.startswith(".tmp-") or (path.name.isdigit() and path.name not in keep):
            shutil.rmtree(path, ignore_errors=True)


