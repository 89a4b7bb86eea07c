"""`index sync`: make the index match its folders in one new generation.

For each image under a synced folder, the stored `file_size` and `modified` say whether it
may have changed; only then (or for a path the index does not know) are its bytes hashed,
and the stored `sha256` decides:
- same path, same size and time: unchanged, nothing read;
- same path, other size or time, same content: touched; its facts are refreshed, no encode;
- same path, other content: changed; re-encoded (a new id: its old one is deleted);
- a new path whose content a vanished path held: moved; it keeps its id and embedding;
- a new path otherwise: added; a vanished path otherwise: removed.

The encode runs as a resumable job (`indexer.build.Job`): a kill -9 leaves the last good
generation served, and the next sync finds the same work and resumes it. The write takes the
store's writer lock like every other writer. A sync that finds nothing to do writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from indexer.build import Job, media_roots
from indexer.config import DEFAULT_CONFIG, BuildConfig
from indexer.selection import EVERYTHING_VISIBLE, Selection
from indexer.shards import staged, streamed_records
from indexer.sources import Collection, ImageEntry, collect
from retrieval.digest import sha256_file
from retrieval.errors import ManifestError
from retrieval.models.clip import ClipModel
from retrieval.models.identity import ModelIdentity, model_identity
from retrieval.progress import ProgressFactory
from retrieval.store import (
    PROVISIONAL_BASE,
    append_items,
    open_generation,
    read_generation_manifest,
    update_generation,
)

Stored = tuple[int, dict[str, Any]]  # an indexed image: its id and metadata


@dataclass
class SyncReport:
    """What a sync found (and, unless a dry run or nothing to do, wrote)."""

    added: int = 0
    changed: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0  # touched files (same content, new time) among them
    touched: int = 0
    excluded: int = 0  # left out by --exclude, .clipdexignore or being hidden
    skipped: dict[str, int] = field(default_factory=dict)  # by reason, e.g. not_an_image
    generation: str | None = None  # None: nothing written
    dry_run: bool = False
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """The differences between the folders and the index."""

    encode: list[ImageEntry] = field(default_factory=list)  # added and changed
    delete: list[int] = field(default_factory=list)  # changed (old id) and removed
    repath: dict[int, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.encode or self.delete or self.repath)


def sync(sources: Sequence[Path], index: Path, load: Callable[[], ClipModel],
         config: BuildConfig = DEFAULT_CONFIG, selection: Selection = EVERYTHING_VISIBLE,
         dry_run: bool = False, progress: ProgressFactory | None = None) -> SyncReport:
    """Bring `index` in line with the folders `sources`; `load` gives the model, called only
    when something must be encoded."""
    started = time.perf_counter()
    folders = _checked_folders(sources)
    collection = collect(folders, replace(selection, hash_files=False))
    collection.images = [entry for entry in collection.images if entry.member is None]
    built = read_generation_manifest(index)
    with open_generation(index, built.model.sha256, built.model.embed_dim) as current:
        stored = {path: (item_id, metadata) for folder in folders
                  for item_id, path, metadata in current.image_files(str(folder))}
        parent = current.name
    report = SyncReport(excluded=collection.excluded, dry_run=dry_run)
    plan = _compare(collection.images, stored, report)
    if not plan.empty and not dry_run:
        report.generation = _write(index, built.model, plan, collection, load, config, parent,
                                   progress, folders, report)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def _checked_folders(sources: Sequence[Path]) -> list[Path]:
    """The sources, resolved; a missing folder stops the sync (an unmounted drive must never
    read as every photo deleted) and anything but a folder is refused."""
    folders = []
    for source in map(Path, sources):
        if not source.exists():
            raise ManifestError(f"{source} is missing (an unmounted drive?): nothing was "
                                "changed; sync again once it is back")
        if not source.is_dir():
            raise ManifestError(f"{source}: index sync follows folders; add a manifest's or a "
                                "shard's new rows with `clipdex index add` and remove rows "
                                "with `clipdex index delete`")
        folders.append(source.resolve())
    return folders


def _compare(found: list[ImageEntry], stored: dict[str, Stored], report: SyncReport) -> Plan:
    """Sort every file into unchanged, touched, changed, moved, added; the rest removed."""
    plan, new = Plan(), []
    for entry in found:
        known = stored.pop(str(entry.path), None)
        if known is None:
            new.append(entry)
        elif _same_stat(entry.metadata, known[1]):
            report.unchanged += 1
        elif _hashed(entry) == known[1].get("sha256"):
            plan.repath[known[0]] = (str(entry.path), entry.metadata)
            report.unchanged += 1
            report.touched += 1
        else:
            plan.delete.append(known[0])
            plan.encode.append(entry)
            report.changed += 1
    vanished = {metadata.get("sha256"): item_id for item_id, metadata in stored.values()
                if metadata.get("sha256")}
    for entry in new:
        item_id = vanished.pop(_hashed(entry), None)
        if item_id is None:
            plan.encode.append(entry)
            report.added += 1
        else:
            plan.repath[item_id] = (str(entry.path), entry.metadata)
            report.moved += 1
    gone = [item_id for item_id, _ in stored.values() if item_id not in plan.repath]
    plan.delete += gone
    report.removed = len(gone)
    return plan


def _same_stat(found: dict[str, Any], known: dict[str, Any]) -> bool:
    return (found.get("file_size") == known.get("file_size")
            and found.get("modified") == known.get("modified"))


def _hashed(entry: ImageEntry) -> str:
    """The entry's content hash, computed once and kept in its metadata."""
    if "sha256" not in entry.metadata:
        entry.metadata["sha256"] = sha256_file(entry.path)
    return str(entry.metadata["sha256"])


def _write(index: Path, identity: ModelIdentity, plan: Plan, collection: Collection,
           load: Callable[[], ClipModel], config: BuildConfig, parent: str,
           progress: ProgressFactory | None, folders: list[Path], report: SyncReport) -> str:
    """Encode what is new or changed (a resumable job) and write one generation: the new
    items, the deletions and the moves together, under the store's writer lock. `identity`:
    the model the index was built with (a loaded model must match it)."""
    info = {"action": "sync", "sources": [str(f) for f in folders], **report.as_json()}
    if not plan.encode:
        return update_generation(index, identity, delete_ids=plan.delete,
                                 options=config.store_options(), build_info=info,
                                 repath=plan.repath)
    clip = load()
    identity = model_identity(clip)
    work = Collection(plan.encode, [], [])
    job = Job(index, identity, work, config, parent=parent)
    started = time.perf_counter()
    encoded = job.run(clip, progress=progress)
    problems = collection.problems + encoded.problems()
    added = streamed_records(work.images, job.texts, encoded, PROVISIONAL_BASE)
    records = [record for batch in added.batches() for record in batch]
    with staged(job.work, index, encoded, clip.embed_dim) as vectors:
        appended = append_items(index, identity, records, vectors, config.store_options(), info,
                                media_roots(folders, work, problems), delete_ids=plan.delete,
                                repath=plan.repath)
    counts = {m: len(ids) for m, ids in added.ids.items()}
    report.skipped = job.finish(appended.manifest, counts, problems, started).skipped
    return appended.generation
