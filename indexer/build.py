"""The indexing job: encode sources in resumable shards, then write one store generation.

Encoded shards land in DIR/work/<job-hash>/ as `images-00012.npy` (kept embeddings) plus
`images-00012.json` (their positions and the skipped files), each written atomically, the JSON
last as the commit mark. A rerun of the same job (same model, files, sizes, shard size) loads
finished shards and encodes only the rest, so a kill -9 costs at most one shard of work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from indexer.sources import Collection, ImageEntry, collect
from retrieval.encode import encode_image_batch, encode_texts
from retrieval.errors import IndexStoreError, UnknownItemError
from retrieval.images import DEFAULT_MAX_PIXELS
from retrieval.manifest import Problem
from retrieval.model import ClipModel
from retrieval.pipeline import iter_image_batches
from retrieval.store import (
    Generation,
    ItemRecord,
    ModelIdentity,
    StoreOptions,
    append_items,
    maybe_fault,
    model_identity,
    open_generation,
    update_generation,
    write_generation,
)

# (kept positions, their (m, d) embeddings, problems, how many inputs the step consumed)
Step = tuple[list[int], np.ndarray, list[tuple[int, Problem]], int]


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> Any: ...


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


ProgressFactory = Callable[[str, int], Bar]  # (label, total) -> a tqdm-like bar


@dataclass(frozen=True)
class BuildConfig:
    batch_size: int = 64
    workers: int | None = None  # image decoding processes (None: up to 4)
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_size: int = 2048
    max_memory: str = "4GB"
    index_kind: str | None = None
    precision: str = "auto"

    def store_options(self) -> StoreOptions:
        return StoreOptions(max_memory=self.max_memory, index_kind=self.index_kind)


@dataclass
class Summary:
    generation: str
    images: int
    texts: int
    skipped: dict[str, int] = field(default_factory=dict)  # by reason
    shards_resumed: int = 0
    shards_encoded: int = 0
    seconds: float = 0.0
    errors_file: str | None = None
    tuning: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build(sources: Sequence[Path], out: Path, clip: ClipModel, config: BuildConfig = BuildConfig(),
          progress: ProgressFactory | None = None) -> Summary:
    """Index `sources` into a new generation of `out` (a fresh id space starting at 1)."""
    started = time.perf_counter()
    collection = collect(sources)
    identity = model_identity(clip)
    job = _Job(out, identity, collection, config, parent=None)
    records, vectors, problems = job.run(clip, start_id=1, progress=progress)
    info = _build_info(sources, collection, problems)
    name = write_generation(out, identity, records, vectors, config.store_options(), info)
    return job.finish(name, records, problems, started)


def add(sources: Sequence[Path], index: Path, clip: ClipModel,
        config: BuildConfig = BuildConfig(), progress: ProgressFactory | None = None) -> Summary:
    """Add what is new in `sources` (images by path, free texts by content) to the index."""
    started = time.perf_counter()
    identity = model_identity(clip)
    with open_generation(index, identity.sha256, identity.embed_dim) as current:
        collection = _only_new(collect(sources), current)
        parent = current.name
    job = _Job(index, identity, collection, config, parent=parent)
    # Provisional ids from 0: the store allocates the real ones under its writer lock, so an
    # admin write through the service while this job encodes is no conflict.
    records, vectors, problems = job.run(clip, start_id=0, progress=progress)
    info = _build_info(sources, collection, problems)
    appended = append_items(index, identity, records, vectors, config.store_options(), info)
    return job.finish(appended.generation, records, problems, started)


def delete(index: Path, ids: Sequence[int] = (), paths: Sequence[Path] = (),
           config: BuildConfig = BuildConfig()) -> str:
    """Tombstone items by id or image path into a new generation (captions go too)."""
    with open_generation(index) as current:
        identity = ModelIdentity(**current.manifest["model"])
        wanted = [str(Path(p).resolve()) for p in paths]
        found = current.ids_for_paths(wanted)
    missing = [p for p in wanted if p not in found]
    if missing:
        raise UnknownItemError(f"no live image with path {missing[0]} in {index}")
    return update_generation(index, identity, delete_ids=[*ids, *found.values()],
                             options=config.store_options(), build_info={"action": "delete"})


def compact(index: Path, config: BuildConfig = BuildConfig()) -> str:
    """Rewrite the index without tombstones (and re-choose the index type for its size)."""
    with open_generation(index) as current:
        identity = ModelIdentity(**current.manifest["model"])
    return update_generation(index, identity, options=config.store_options(), compact=True,
                             build_info={"action": "compact"})


def _only_new(collection: Collection, current: Generation) -> Collection:
    known = current.ids_for_paths(str(entry.path) for entry in collection.images)
    images = [entry for entry in collection.images if str(entry.path) not in known]
    seen = current.ids_for_texts(entry.text for entry in collection.texts)
    texts = [entry for entry in collection.texts if entry.text not in seen]
    return Collection(images, texts, collection.problems)


def _build_info(sources: Sequence[Path], collection: Collection,
                problems: list[Problem]) -> dict[str, Any]:
    return {"sources": [str(Path(s).resolve()) for s in sources],
            "images_found": len(collection.images), "captions": collection.num_captions,
            "corpus_texts": len(collection.texts), "skipped": len(problems)}


class _Job:
    """One encoding job and its work folder of shards."""

    def __init__(self, out: Path, identity: ModelIdentity, collection: Collection,
                 config: BuildConfig, parent: str | None):
        self.out, self.collection, self.config = Path(out), collection, config
        # texts: every caption (in image order), then the free corpus texts
        self.texts = [(caption, {}, index) for index, entry in enumerate(collection.images)
                      for caption in entry.captions]
        self.texts += [(entry.text, entry.metadata, None) for entry in collection.texts]
        self.work = self.out / "work" / _job_hash(identity, collection, config, parent)
        self.parent = parent
        self.resumed = self.encoded = 0

    def run(self, clip: ClipModel, start_id: int, progress: ProgressFactory | None
            ) -> tuple[list[ItemRecord], dict[str, np.ndarray], list[Problem]]:
        progress = progress or (lambda label, total: _NoBar())
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "job.json").write_text(json.dumps({"parent": self.parent}))
        paths = [entry.path for entry in self.collection.images]
        image_pos, image_vectors, problems = self._sharded(
            "images", len(paths), clip.embed_dim, lambda todo: self._image_steps(clip, paths, todo),
            progress("images", len(paths)))
        text_pos, text_vectors, _ = self._sharded(
            "texts", len(self.texts), clip.embed_dim, lambda todo: self._text_steps(clip, todo),
            progress("texts", len(self.texts)))
        records = self._records(image_pos, text_pos, start_id)
        # missing files and unreadable sidecars found while reading sources come first
        problems = self.collection.problems + problems
        return records, {"image": image_vectors, "text": text_vectors}, problems

    def finish(self, name: str, records: list[ItemRecord], problems: list[Problem],
               started: float) -> Summary:
        """Write errors.jsonl beside the generations and drop the shards."""
        report = self.out / "errors.jsonl"
        temp = report.with_suffix(".jsonl.tmp")
        temp.write_text("".join(json.dumps({"path": p.path, "reason": p.reason,
                                            "kind": skip_kind(p)}) + "\n" for p in problems))
        os.replace(temp, report)
        shutil.rmtree(self.work, ignore_errors=True)
        _drop_stale_add_jobs(self.out / "work")
        kinds: dict[str, int] = {}
        for problem in problems:
            kinds[skip_kind(problem)] = kinds.get(skip_kind(problem), 0) + 1
        manifest = json.loads((self.out / "generations" / name / "manifest.json").read_text())
        tuning = {m: s["tuning"] for m, s in manifest["modalities"].items()}
        return Summary(generation=name, images=sum(r.modality == "image" for r in records),
                       texts=sum(r.modality == "text" for r in records), skipped=kinds,
                       shards_resumed=self.resumed, shards_encoded=self.encoded,
                       seconds=round(time.perf_counter() - started, 2),
                       errors_file=str(report), tuning=tuning)

    def _records(self, image_pos: np.ndarray, text_pos: np.ndarray,
                 start_id: int) -> list[ItemRecord]:
        """Ids in input order: kept images first, then texts; a caption links to its image."""
        images, records = self.collection.images, []
        image_ids: dict[int, int] = {}
        for offset, position in enumerate(image_pos.tolist()):
            entry: ImageEntry = images[position]
            image_ids[position] = start_id + offset
            records.append(ItemRecord(start_id + offset, "image", path=str(entry.path),
                                      captions=list(entry.captions), metadata=entry.metadata))
        next_id = start_id + len(records)
        for offset, position in enumerate(text_pos.tolist()):
            text, metadata, owner = self.texts[position]
            if owner is not None:  # a caption: image_id links it to its image (no path here:
                metadata = {}      # item metadata reaches clients, the server's layout must not)
            records.append(ItemRecord(next_id + offset, "text", text=text, metadata=metadata,
                                      image_id=image_ids.get(owner) if owner is not None else None))
        return records

    def _image_steps(self, clip: ClipModel, paths: list[Path], todo: list[int]) -> Iterator[Step]:
        """Decode in DataLoader workers while this process encodes the previous batch."""
        batches = iter_image_batches([paths[i] for i in todo], clip.preprocess,
                                     self.config.batch_size, self.config.workers,
                                     clip.device.type == "cuda", self.config.max_pixels,
                                     uint8=True)
        for batch in batches:
            kept = [todo[i] for i in batch.indices]
            vectors = (encode_image_batch(clip, batch.pixels, self.config.precision) if kept
                       else np.zeros((0, clip.embed_dim), np.float32))
            problems = [(todo[i], problem) for i, problem in batch.problems]
            yield kept, vectors, problems, len(kept) + len(problems)

    def _text_steps(self, clip: ClipModel, todo: list[int]) -> Iterator[Step]:
        step = self.config.batch_size * 4
        for start in range(0, len(todo), step):
            part = todo[start:start + step]
            vectors = encode_texts(clip, [self.texts[i][0] for i in part],
                                   precision=self.config.precision)
            yield part, vectors, [], len(part)

    def _sharded(self, prefix: str, count: int, dim: int,
                 steps: Callable[[list[int]], Iterator[Step]], bar: Bar
                 ) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
        """Encode positions 0..count-1 shard by shard; returns (kept positions (m,),
        embeddings (m, d), problems), reusing shards already on disk."""
        size = self.config.shard_size
        shards = list(range((count + size - 1) // size))
        done = {s: self._load_shard(prefix, s) for s in shards}
        done = {s: v for s, v in done.items() if v is not None}
        self.resumed += len(done)
        bar.update(sum(min(size, count - s * size) for s in done))
        todo = [p for s in shards if s not in done for p in range(s * size, min(count, (s + 1) * size))]
        if todo:
            done.update(self._encode_pending(prefix, todo, steps, bar))
        bar.close()
        return _concatenate([done[s] for s in shards], dim)

    def _encode_pending(self, prefix: str, todo: list[int],
                        steps: Callable[[list[int]], Iterator[Step]], bar: Bar) -> dict[int, tuple]:
        """Run `steps` over the sorted positions `todo`, writing each shard once all of its
        inputs are through (steps may straddle shard boundaries)."""
        size = self.config.shard_size
        pending = sorted({p // size for p in todo})
        kept: list[tuple[int, np.ndarray]] = []
        problems: list[tuple[int, Problem]] = []
        written: dict[int, tuple] = {}
        cursor = 0
        for step_kept, step_vectors, step_problems, consumed in steps(todo):
            kept += zip(step_kept, step_vectors)
            problems += step_problems
            cursor += consumed
            bar.update(consumed)
            while pending and (cursor >= len(todo) or todo[cursor] // size > pending[0]):
                shard = pending.pop(0)
                limit = (shard + 1) * size
                written[shard] = self._flush(prefix, shard, [k for k in kept if k[0] < limit],
                                             [x for x in problems if x[0] < limit])
                kept = [k for k in kept if k[0] >= limit]
                problems = [x for x in problems if x[0] >= limit]
        return written

    def _flush(self, prefix: str, shard: int, kept: list[tuple[int, np.ndarray]],
               problems: list[tuple[int, Problem]]) -> tuple:
        """Write one shard atomically, the JSON (the commit mark) after the .npy."""
        # a shard of only skipped files is (0, 0): its width is unknown here and irrelevant
        vectors = (np.stack([v for _, v in kept]).astype(np.float32) if kept
                   else np.zeros((0, 0), np.float32))
        base = self.work / f"{prefix}-{shard:05d}"
        with open(f"{base}.npy.tmp", "wb") as handle:
            np.save(handle, vectors)
        os.replace(f"{base}.npy.tmp", f"{base}.npy")
        meta = {"positions": [p for p, _ in kept],
                "problems": [{"position": p, "path": x.path, "reason": x.reason}
                             for p, x in problems]}
        Path(f"{base}.json.tmp").write_text(json.dumps(meta))
        os.replace(f"{base}.json.tmp", f"{base}.json")
        self.encoded += 1
        maybe_fault("after_shard", shard)
        return [p for p, _ in kept], vectors, [x for _, x in problems]

    def _load_shard(self, prefix: str, shard: int) -> tuple | None:
        base = self.work / f"{prefix}-{shard:05d}"
        if not Path(f"{base}.json").is_file():
            return None
        meta = json.loads(Path(f"{base}.json").read_text())
        vectors = np.load(f"{base}.npy")
        if len(vectors) != len(meta["positions"]):
            raise IndexStoreError(f"{base}.npy does not match its JSON; delete {self.work}")
        problems = [Problem(p["path"], p["reason"]) for p in meta["problems"]]
        return meta["positions"], vectors, problems


def _drop_stale_add_jobs(work: Path) -> None:
    """Shards of a killed `add` are keyed to the generation it started from; once another
    generation is committed that job can never resume, so its shards are only disk waste.
    (A killed `build` starts from nothing and stays resumable: its shards are kept.)"""
    for folder in work.iterdir() if work.is_dir() else ():
        try:
            parent = json.loads((folder / "job.json").read_text())["parent"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge
        if parent is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _concatenate(parts: list[tuple], dim: int) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
    positions = np.array([p for part in parts for p in part[0]], dtype=np.int64)
    filled = [part[1] for part in parts if len(part[1])]
    vectors = (np.concatenate(filled).astype(np.float32)
               if filled else np.zeros((0, dim), np.float32)).reshape(-1, dim)
    return positions, vectors, [x for part in parts for x in part[2]]


def _job_hash(identity: ModelIdentity, collection: Collection, config: BuildConfig,
              parent: str | None) -> str:
    """Same model, same files (by size and mtime), same texts and shard size: same job."""
    digest = hashlib.sha256(json.dumps([identity.sha256, config.max_pixels, config.shard_size,
                                        parent]).encode())
    for entry in collection.images:
        stat = entry.path.stat() if entry.path.exists() else None
        digest.update(f"{entry.path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\0"
                      f"{len(entry.captions)}\n".encode())
        digest.update("\0".join(entry.captions).encode())
    for text in collection.texts:
        digest.update(text.text.encode() + b"\n")
    return digest.hexdigest()[:16]


def skip_kind(problem: Problem) -> str:
    """A short reason class for summaries; the full message stays in errors.jsonl."""
    reason = problem.reason
    if os.path.isfile(problem.path) and os.path.getsize(problem.path) == 0:
        return "empty_file"
    for needle, kind in (("pixel cap", "too_large"), ("MiB cap", "too_large"), ("bomb", "too_large"),
                         ("truncated", "truncated"), ("not found", "missing"),
                         ("cannot identify", "not_an_image"), ("cannot decode", "corrupt")):
        if needle in reason:
            return kind
    return "other"
