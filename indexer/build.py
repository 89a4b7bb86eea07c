"""The indexing job: encode sources in resumable shards, then write one store generation.

FinishedShards shards are kept in the index directory's work area (`retrieval.store.work`), keyed by
a hash of the job: a rerun of the same job (same model, files, sizes, shard size) loads
finished shards and encodes only the rest, so a kill -9 costs at most one shard of work. Every
file the job writes goes through `retrieval.store`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from indexer.config import DEFAULT_CONFIG, BuildConfig, Summary
from indexer.shards import FinishedShards, staged, streamed_records
from indexer.sources import Collection, collect
from retrieval.inputs.captions import Skipped
from retrieval.models.clip import ClipModel
from retrieval.models.files import decode_niceness, iter_image_batches
from retrieval.models.identity import ModelIdentity, model_identity
from retrieval.models.inference import encode_image_batch, encode_texts
from retrieval.progress import Bar, ProgressFactory, no_progress
from retrieval.store import (
    PROVISIONAL_BASE,
    Generation,
    GenerationManifest,
    JobFolder,
    Shard,
    StoreOptions,
    append_items,
    drop_stale_add_jobs,
    open_generation,
    read_generation_manifest,
    update_generation,
    write_error_report,
    write_generation,
)

DECODER = "jpeg-draft/1"  # reduced-size JPEG decoding (retrieval.inputs.images.DecodeLimits)
# (kept positions, their (m, d) embeddings, problems, how many inputs the step consumed)
Step = tuple[list[int], np.ndarray, list[tuple[int, Skipped]], int]


# makes the job of a build: (index root, model identity, what to encode, config, parent)
JobFactory = Callable[[Path, ModelIdentity, Collection, "BuildConfig", "str | None"], "Job"]



def build(sources: Sequence[Path], out: Path, clip: ClipModel,
          config: BuildConfig = DEFAULT_CONFIG,
          progress: ProgressFactory | None = None, engine: JobFactory | None = None) -> Summary:
    """Index `sources` into a new generation of `out` (a fresh id space starting at 1);
    `engine` makes the job that encodes (default: this process, `Job`)."""
    started = time.perf_counter()
    collection = collect(sources)
    identity = model_identity(clip)
    job = (engine or Job)(out, identity, collection, config, None)
    encoded = job.run(clip, progress=progress)
    problems = collection.problems + encoded.problems()
    info = {**_build_info(sources, collection, problems, clip), "engine": job.ENGINE}
    records = streamed_records(collection.images, job.texts, encoded, first_id=1)
    with staged(job.work, out, encoded, clip.embed_dim) as vectors:
        name = write_generation(out, identity, records, vectors, job.store_options(), info,
                                media_roots(sources, collection, problems))
    counts = {m: len(ids) for m, ids in records.ids.items()}
    return job.finish(read_generation_manifest(out, name), counts, problems, started)


def add(sources: Sequence[Path], index: Path, clip: ClipModel,
        config: BuildConfig = DEFAULT_CONFIG, progress: ProgressFactory | None = None) -> Summary:
    """Add what is new in `sources` (images by path, free texts by content) to the index."""
    started = time.perf_counter()
    identity = model_identity(clip)
    with open_generation(index, identity.sha256, identity.embed_dim) as current:
        collection = _only_new(collect(sources), current)
        parent = current.name
    job = Job(index, identity, collection, config, parent=parent)
    encoded = job.run(clip, progress=progress)
    problems = collection.problems + encoded.problems()
    info = _build_info(sources, collection, problems, clip)
    # Provisional ids: the store allocates the real ones under its writer lock, so an admin
    # write through the service while this job encodes is no conflict.
    added = streamed_records(collection.images, job.texts, encoded, PROVISIONAL_BASE)
    records = [record for batch in added.batches() for record in batch]
    with staged(job.work, index, encoded, clip.embed_dim) as vectors:
        appended = append_items(index, identity, records, vectors, config.store_options(), info,
                                media_roots(sources, collection, problems))
    counts = {m: len(ids) for m, ids in added.ids.items()}
    return job.finish(appended.manifest, counts, problems, started)


def compact(index: Path, config: BuildConfig = DEFAULT_CONFIG) -> str:
    """Rewrite the index without tombstones (and re-choose the index type for its size)."""
    identity = read_generation_manifest(index).model
    return update_generation(index, identity, options=config.store_options(), compact=True,
                             build_info={"action": "compact"})


def _only_new(collection: Collection, current: Generation) -> Collection:
    known = current.ids_for_paths(str(entry.path) for entry in collection.images)
    images = [entry for entry in collection.images if str(entry.path) not in known]
    seen = current.ids_for_texts(entry.text for entry in collection.texts)
    texts = [entry for entry in collection.texts if entry.text not in seen]
    return Collection(images, texts, collection.problems)


def media_roots(sources: Sequence[Path], collection: Collection,
                problems: list[Skipped]) -> list[Path]:
    """The folders whose files the service may serve: the folder sources, and the folders
    of the images a manifest named that were indexed (a file that failed to decode adds
    none: a link to a system file in a photo folder must not make its folder a root)."""
    skipped = {problem.path for problem in problems}
    folders = [Path(source) for source in sources if Path(source).is_dir()]
    return folders + [entry.path.parent for entry in collection.images
                      if entry.member is None and str(entry.path) not in skipped
                      and not any(entry.path.is_relative_to(f.resolve()) for f in folders)]


def _build_info(sources: Sequence[Path], collection: Collection, problems: list[Skipped],
                clip: ClipModel) -> dict[str, Any]:
    """What the manifest's "build" section says; `backend` is what ran the towers (torch or
    onnx: their embeddings agree to a cosine of 0.9999, tests/retrieval/test_onnx.py)."""
    return {"sources": [str(Path(s).resolve()) for s in sources],
            "images_found": len(collection.images), "captions": collection.num_captions,
            "corpus_texts": len(collection.texts), "skipped": len(problems),
            "backend": clip.backend}


class Job:
    """One encoding job and its work folder of shards, encoded in this process."""

    ENGINE = "local"  # in the job's hash: another engine's shards are never mixed in
    WORK = JobFolder  # the shards' format

    def __init__(self, out: Path, identity: ModelIdentity, collection: Collection,
                 config: BuildConfig, parent: str | None):
        self.out, self.collection, self.config = Path(out), collection, config
        # texts: every caption (in image order), then the free corpus texts
        self.texts = [(caption, {}, index) for index, entry in enumerate(collection.images)
                      for caption in entry.captions]
        self.texts += [(entry.text, entry.metadata, None) for entry in collection.texts]
        self.work = self.WORK(self.out, _job_hash(identity, collection, config, parent,
                                                  self.ENGINE))
        self.parent = parent
        self.resumed = self.encoded = 0

    def run(self, clip: ClipModel, progress: ProgressFactory | None) -> FinishedShards:
        """Encode what is not in finished shards yet; the shards keep the embeddings."""
        progress = progress or no_progress
        self.work.start(self.parent)
        counts = {"images": len(self.collection.images), "texts": len(self.texts)}
        bars = {prefix: progress(prefix, count) for prefix, count in counts.items()}
        done = {prefix: self._finished(prefix, count, bars[prefix])
                for prefix, count in counts.items()}
        todo = {prefix: _pending(self.config.shard_size, count, done[prefix])
                for prefix, count in counts.items()}
        for prefix, written in self._encode(todo, clip, bars).items():
            done[prefix].update(written)
        for bar in bars.values():
            bar.close()
        return FinishedShards(done)

    def store_options(self) -> StoreOptions:
        """How the store writes this job's generation (an engine may fill index blocks)."""
        return self.config.store_options()

    def finish(self, written: GenerationManifest, counts: dict[str, int],
               problems: list[Skipped], started: float) -> Summary:
        """Write the error report beside the generations and drop the shards."""
        report = write_error_report(self.out, ({"path": p.path, "reason": p.reason,
                                                 "kind": skip_kind(p)} for p in problems))
        self.work.remove()
        drop_stale_add_jobs(self.out)
        kinds: dict[str, int] = {}
        for problem in problems:
            kinds[skip_kind(problem)] = kinds.get(skip_kind(problem), 0) + 1
        return Summary(generation=written.name, images=counts["image"], texts=counts["text"],
                       skipped=kinds, shards_resumed=self.resumed, shards_encoded=self.encoded,
                       seconds=round(time.perf_counter() - started, 2),
                       errors_file=str(report), tuning=written.tuning())

    def _image_steps(self, clip: ClipModel, todo: list[int]) -> Iterator[Step]:
        """Decode in DataLoader workers while this process encodes the previous batch."""
        images = self.collection.images
        batches = iter_image_batches([images[i].source for i in todo], clip.preprocess,
                                     self.config.batch_size, self.config.workers,
                                     clip.device.type == "cuda", self.config.max_pixels,
                                     uint8=True, nice=decode_niceness(clip))
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

    def _finished(self, prefix: str, count: int, bar: Bar) -> dict[int, Shard]:
        """The shards of positions 0..count-1 already on disk (a resumed job's)."""
        size = self.config.shard_size
        done = {s: self.work.load(prefix, s) for s in range((count + size - 1) // size)}
        done = {s: v for s, v in done.items() if v is not None}
        self.resumed += len(done)
        bar.update(sum(min(size, count - s * size) for s in done))
        return done

    def _encode(self, todo: dict[str, list[int]], clip: ClipModel, bars: dict[str, Bar]
                ) -> dict[str, dict[int, Shard]]:
        """Encode the sorted pending positions of each prefix in this process, shard by shard
        (an engine that encodes elsewhere overrides this)."""
        written = {}
        for prefix, positions in todo.items():
            steps = self._image_steps if prefix == "images" else self._text_steps
            written[prefix] = (self._encode_pending(prefix, positions,
                                                    functools.partial(steps, clip), bars[prefix])
                               if positions else {})
        return written

    def _encode_pending(self, prefix: str, todo: list[int],
                        steps: Callable[[list[int]], Iterator[Step]], bar: Bar) -> dict[int, Shard]:
        """Run `steps` over the sorted positions `todo`, writing each shard once all of its
        inputs are through (steps may straddle shard boundaries)."""
        size = self.config.shard_size
        pending = sorted({p // size for p in todo})
        kept: list[tuple[int, np.ndarray]] = []
        problems: list[tuple[int, Skipped]] = []
        written: dict[int, Shard] = {}
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
               problems: list[tuple[int, Skipped]]) -> Shard:
        shard_data = self.work.save(prefix, shard, kept, problems)
        self.encoded += 1
        return shard_data


def _pending(size: int, count: int, done: dict[int, Shard]) -> list[int]:
    """Positions 0..count-1 not in a finished shard, in order."""
    return [p for s in range((count + size - 1) // size) if s not in done
            for p in range(s * size, min(count, (s + 1) * size))]


def _job_hash(identity: ModelIdentity, collection: Collection, config: BuildConfig,
              parent: str | None, engine: str) -> str:
    """Same model, same files (by size and mtime; a tar shard's for its members), same texts
    and shard size, same decoder, engine and precision: same job (DECODER names the decoding,
    so shards of an older decoder are not mixed in; fp16 shards never join fp32 ones)."""
    digest = hashlib.sha256(json.dumps([identity.sha256, config.max_pixels, config.shard_size,
                                        parent, DECODER, engine, config.precision]).encode())
    stats: dict[Path, os.stat_result | None] = {}  # a tar shard's entries share its stat
    for entry in collection.images:
        if entry.file not in stats:
            stats[entry.file] = entry.file.stat() if entry.file.exists() else None
        stat = stats[entry.file]
        digest.update(f"{entry.path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\0"
                      f"{len(entry.captions)}\n".encode())
        digest.update("\0".join(entry.captions).encode())
    for text in collection.texts:
        digest.update(text.text.encode() + b"\n")
    return digest.hexdigest()[:16]


def skip_kind(problem: Skipped) -> str:
    """A short reason class for summaries; the full message stays in errors.jsonl."""
    reason = problem.reason
    if os.path.isfile(problem.path) and os.path.getsize(problem.path) == 0:
        return "empty_file"
    for needle, kind in (("pixel cap", "too_large"), ("MiB cap", "too_large"), ("bomb", "too_large"),
                         ("truncated", "truncated"), ("not found", "missing"),
                         ("empty file", "empty_file"),
                         ("cannot identify", "not_an_image"), ("cannot decode", "corrupt")):
        if needle in reason:
            return kind
    return "other"
