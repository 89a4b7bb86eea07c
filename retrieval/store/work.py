"""An indexing job's scratch space inside the index directory, and its error report.

DIR/work/<job>/ holds `job.json` (the generation the job started from) and encoded shards:
`images-00012.npy` (the kept (m, d) embeddings) plus `images-00012.json` (their positions and
the skipped inputs), each written atomically, the JSON last as the commit mark. A job that is
run again with the same key finds its finished shards here and encodes only the rest.
DIR/errors.jsonl lists what the last job skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexStoreError
from retrieval.manifest import Problem
from retrieval.store import layout
from retrieval.store.faults import fault_point


@dataclass(frozen=True)
class Shard:
    positions: list[int]  # (m,) input positions that were kept
    vectors: np.ndarray  # (m, d) their embeddings; (0, 0) for a shard of only skipped inputs
    problems: list[Problem]  # the skipped inputs


class JobFolder:
    """DIR/work/<job>/ of one indexing job, keyed by `job` (a hash of what it encodes)."""

    def __init__(self, root: Path, job: str):
        self.path = layout.job_dir(root, job)

    def start(self, parent: str | None) -> None:
        """Create the folder and record the parent generation (None for a fresh build)."""
        self.path.mkdir(parents=True, exist_ok=True)
        layout.job_record(self.path).write_text(json.dumps({"parent": parent}))

    def save(self, prefix: str, shard: int, kept: Sequence[tuple[int, np.ndarray]],
             problems: Sequence[tuple[int, Problem]]) -> Shard:
        """Write one shard atomically from (position, (d,) embedding) pairs and (position,
        problem) pairs, the JSON (the commit mark) after the .npy."""
        # a shard of only skipped files is (0, 0): its width is unknown here and irrelevant
        vectors = (np.stack([v for _, v in kept]).astype(np.float32) if kept
                   else np.zeros((0, 0), np.float32))
        files = layout.shard_files(self.path, prefix, shard)
        _replace_with(files.vectors, lambda handle: np.save(handle, vectors))
        meta = {"positions": [p for p, _ in kept],
                "problems": [{"position": p, "path": x.path, "reason": x.reason}
                             for p, x in problems]}
        _replace_with(files.meta, lambda handle: handle.write(json.dumps(meta).encode()))
        fault_point("after_shard", shard)
        return Shard([p for p, _ in kept], vectors, [x for _, x in problems])

    def load(self, prefix: str, shard: int) -> Shard | None:
        """A finished shard, or None when it was never committed."""
        files = layout.shard_files(self.path, prefix, shard)
        if not files.meta.is_file():
            return None
        meta = json.loads(files.meta.read_text())
        vectors = np.load(files.vectors)
        if len(vectors) != len(meta["positions"]):
            raise IndexStoreError(f"{files.vectors} does not match its JSON; delete {self.path}")
        problems = [Problem(p["path"], p["reason"]) for p in meta["problems"]]
        return Shard(meta["positions"], vectors, problems)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


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
    temp = report.with_suffix(".jsonl.tmp")
    temp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(temp, report)
    return report


def _replace_with(path: Path, write: Any) -> None:
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as handle:
        write(handle)
    os.replace(temp, path)
