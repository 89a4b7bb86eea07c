"""An indexing job's scratch space inside the index directory, and its error report.

DIR/work/<job>/ holds `job.json` (the generation the job started from) and encoded shards:
`images-00012.npy` (the kept (m, d) embeddings) plus `images-00012.json` (their positions and
the skipped inputs), each written atomically, the JSON last as the commit mark. A job that is
run again with the same key finds its finished shards here and encodes only the rest.
A Ray build writes `images-00012.parquet` instead (`ParquetJobFolder`), one file a shard.
DIR/errors.jsonl lists what the last job skipped.
DIR/work/staged-<name>.npy holds vectors an import stages (`StagedRows`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.ann.rowscan import RowWriter
from retrieval.atomic import write_atomic, write_text_atomic
from retrieval.errors import IndexStoreError
from retrieval.inputs.captions import Skipped
from retrieval.store import layout
from retrieval.store.faults import fault_point


@dataclass(frozen=True)
class Shard:
    """A finished shard: which inputs it kept and which it skipped. Its embeddings stay on
    disk until `vectors` reads them, so a job of millions of inputs holds none of them."""

    positions: list[int]  # (m,) input positions that were kept, ascending
    problems: list[Skipped]  # the skipped inputs


class JobFolder:
    """DIR/work/<job>/ of one indexing job, keyed by `job` (a hash of what it encodes)."""

    def __init__(self, root: Path, job: str):
        self.path = layout.job_dir(root, job)

    def start(self, parent: str | None) -> None:
        """Create the folder and record the parent generation (None for a fresh build)."""
        self.path.mkdir(parents=True, exist_ok=True)
        layout.job_record(self.path).write_text(json.dumps({"parent": parent}))

    def save(self, prefix: str, shard: int, kept: Sequence[tuple[int, np.ndarray]],
             problems: Sequence[tuple[int, Skipped]]) -> Shard:
        """Write one shard atomically from (position, (d,) embedding) pairs and (position,
        problem) pairs, the JSON (the commit mark) after the .npy."""
        # a shard of only skipped files is (0, 0): its width is unknown here and irrelevant
        vectors = (np.stack([v for _, v in kept]).astype(np.float32) if kept
                   else np.zeros((0, 0), np.float32))
        files = layout.shard_files(self.path, prefix, shard)
        write_atomic(files.vectors, lambda handle: np.save(handle, vectors))
        meta = {"positions": [p for p, _ in kept],
                "problems": [{"position": p, "path": x.path, "reason": x.reason}
                             for p, x in problems]}
        write_atomic(files.meta, lambda handle: handle.write(json.dumps(meta).encode()))
        fault_point("after_shard", shard)
        return Shard([p for p, _ in kept], [x for _, x in problems])

    def load(self, prefix: str, shard: int) -> Shard | None:
        """A finished shard, or None when it was never committed."""
        files = layout.shard_files(self.path, prefix, shard)
        if not files.meta.is_file():
            return None
        meta = json.loads(files.meta.read_text())
        problems = [Skipped(p["path"], p["reason"]) for p in meta["problems"]]
        return Shard(meta["positions"], problems)

    def vectors(self, prefix: str, shard: int, kept: int) -> np.ndarray:
        """The (kept, d) embeddings of a finished shard, checked against its record."""
        path = layout.shard_files(self.path, prefix, shard).vectors
        vectors = np.load(path)
        if len(vectors) != kept:
            raise IndexStoreError(f"{path} does not match its JSON; delete {self.path}")
        return vectors.astype(np.float32, copy=False)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class ParquetJobFolder(JobFolder):
    """The same job folder with each shard one parquet file, a row per input: `position`,
    `modality`, `embedding` (null for a skipped input), `path` and `reason` (a skipped
    input's), `metadata` (the item's, as JSON). A Ray build writes these: any parquet reader
    (Ray Data, pandas, DuckDB) can read a job's embeddings."""

    def save(self, prefix: str, shard: int, kept: Sequence[tuple[int, np.ndarray]],
             problems: Sequence[tuple[int, Skipped]],
             metadata: Callable[[int], dict[str, Any]] | None = None) -> Shard:
        """Write one shard atomically (temporary name, then rename): a kill leaves it whole
        or absent."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        kept = sorted(kept, key=lambda pair: pair[0])
        problems = sorted(problems, key=lambda pair: pair[0])
        vectors = (np.stack([v for _, v in kept]).astype(np.float32) if kept
                   else np.zeros((0, 0), np.float32))  # (m, d)
        rows = sorted([(p, n, None) for n, (p, _) in enumerate(kept)] +
                      [(p, None, x) for p, x in problems], key=lambda row: row[0])
        width = vectors.shape[1]
        lengths = [0 if n is None else width for _, n, _ in rows]
        embedding = pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]), pa.int32()),
            pa.array(vectors.reshape(-1)), mask=pa.array([n is None for _, n, _ in rows]))
        table = pa.table({
            "position": pa.array([p for p, _, _ in rows], pa.int64()),
            "modality": pa.array([_MODALITY[prefix]] * len(rows), pa.string()),
            "embedding": embedding,
            "path": pa.array([x and x.path for _, _, x in rows], pa.string()),
            "reason": pa.array([x and x.reason for _, _, x in rows], pa.string()),
            "metadata": pa.array([json.dumps(metadata(p) if metadata else {}, default=str)
                                  for p, _, _ in rows], pa.string())})
        write_atomic(layout.parquet_shard_file(self.path, prefix, shard),
                      lambda handle: pq.write_table(table, handle))
        fault_point("after_shard", shard)
        return Shard([p for p, _ in kept], [x for _, x in problems])

    def load(self, prefix: str, shard: int) -> Shard | None:
        """A finished shard, or None when it was never written (its embeddings unread)."""
        import pyarrow.parquet as pq

        path = layout.parquet_shard_file(self.path, prefix, shard)
        if not path.is_file():
            return None
        table = pq.read_table(path, columns=["position", "path", "reason"])
        reasons, paths = table["reason"].to_pylist(), table["path"].to_pylist()
        positions = table["position"].to_pylist()
        kept = [p for p, reason in zip(positions, reasons) if reason is None]
        problems = [Skipped(where, reason) for where, reason in zip(paths, reasons)
                    if reason is not None]
        return Shard(kept, problems)

    def vectors(self, prefix: str, shard: int, kept: int) -> np.ndarray:
        import pyarrow.parquet as pq

        path = layout.parquet_shard_file(self.path, prefix, shard)
        column = pq.read_table(path, columns=["embedding"])["embedding"].combine_chunks()
        # the skipped rows' embeddings are null, so the flattened values are the kept rows'
        values = column.flatten().to_numpy(zero_copy_only=False)
        if kept == 0:
            return np.zeros((0, 0), np.float32)
        if len(values) % kept:
            raise IndexStoreError(f"{path} does not match its kept rows; delete {self.path}")
        return values.astype(np.float32).reshape(kept, -1)


_MODALITY = {plural: modality for modality, plural in layout.PLURAL.items()}


def drop_stale_add_jobs(root: Path) -> None:
    """Shards of a killed `add` are keyed to the generation it started from; once another
    generation is committed that job can never resume, so its shards are only disk waste.
    (A killed `build` starts from nothing and stays resumable: its shards are kept.)"""
    work = layout.work_dir(root)
    for folder in work.iterdir() if work.is_dir() else ():
        try:
            parent = json.loads(layout.job_record(folder).read_text())["parent"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge
        if parent is not None:
            shutil.rmtree(folder, ignore_errors=True)


def write_error_report(root: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Replace DIR/errors.jsonl (one JSON object a line) atomically; returns its path."""
    report = layout.errors_file(root)
    write_text_atomic(report, "".join(json.dumps(row) + "\n" for row in rows))
    return report


class StagedRows(RowWriter):
    """Vectors an import stages in the index's work folder (work/staged-<name>.npy): written
    front to back, then read back memory-mapped (`rows`); removed with `remove`."""

    def __init__(self, root: Path, name: str, dim: int, capacity: int) -> None:
        super().__init__(layout.staged_rows(root, name), dim, capacity)

    def write(self, rows: np.ndarray) -> None:
        try:
            super().write(rows)
        except ValueError as error:  # the store's typed error for its callers
            raise IndexStoreError(str(error)) from None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
