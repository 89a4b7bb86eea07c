"""`clipdex index build --engine ray`: the indexing job of `indexer.build`, its encoding run
on Ray Data, on this machine or across a cluster.

    driver  collect() -> the listing, one row per input position; finished shards skipped
    tasks   decode and resize to uint8 (`decode_rows`, any CPU); a broken file: an error row
    actors  `EncodingActor`: the model loaded once per actor, the single-process batch functions
    driver  rows -> parquet shards in the index's work folder (the store writes them)
            -> the same records (`indexer.shards`) -> `write_generation`
    tasks   an on-disk IVF index's blocks of lists (`fill_on_ray`), merged on the driver;
            also for `--from-embeddings` imports (`import_on_ray`)

Ids, skipped files and embeddings equal the single-process build's: the same listing, the
same decoder and batch functions, the same record builder; only where the work runs differs.
Ray is imported here only, inside functions: the single-process path never loads it.
"""

from __future__ import annotations

import functools
import os
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.build import Job, build
from indexer.config import DEFAULT_CONFIG, BuildConfig, RayConfig, Summary
from indexer.external_embeddings import ExternalModel, build_from_embeddings
from indexer.sources import Collection
from retrieval.ann.ondisk import BlockJob, fill_block
from retrieval.errors import EngineError, IndexMismatchError, IndexStoreError
from retrieval.inputs.captions import Skipped
from retrieval.models.clip import ClipModel
from retrieval.models.files import (
    DECODE_NICENESS,
    ImageFile,
    TarMember,
    decode_image,
    decode_limits,
)
from retrieval.models.identity import ModelIdentity, model_identity
from retrieval.progress import Bar, ProgressFactory
from retrieval.store import ParquetJobFolder, Shard, StoreOptions

# A Ray worker's own memory once torch and the decoder are imported (535 MiB measured): a
# decode task reserves this plus what one decode may allocate (DecodeLimits.max_bytes).
WORKER_BYTES = 768 * 2**20
Batch = dict[str, np.ndarray]  # a Ray Data batch in numpy format: column -> (n, ...) array


DEFAULT_RAY = RayConfig()


@dataclass(frozen=True)
class ModelSpec:
    """The model as the encoder actors load it (each node loads its own copy), with the
    backend the driver's copy was loaded with (`retrieval.models.loading.load_model`)."""

    name: str
    device: str = "auto"
    backend: str = "torch"


def build_on_ray(sources: Sequence[Path], out: Path, clip: ClipModel, model: ModelSpec,
                 config: BuildConfig = DEFAULT_CONFIG, ray_config: RayConfig = DEFAULT_RAY,
                 progress: ProgressFactory | None = None) -> Summary:
    """`indexer.build.build` with the encoding on Ray; `clip` is the driver's copy of the
    model `model` names (its fingerprint is the index's, and every actor's is checked)."""
    with ray_session(ray_config):
        engine = functools.partial(RayJob, model=model, ray_config=ray_config)
        return build(sources, out, clip, config, progress, engine=engine)


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Use the Ray already initialised in this process, else start one (joining a cluster
    when an address is given) and shut it down after."""
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = config.ray_address or "this machine"
            raise EngineError(f"cannot start or join Ray at {where} ({error}); for a cluster "
                              "run `ray start --head` first, or leave out --ray-address") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command line draws its own
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def fill_on_ray(trained: Path, jobs: Iterable[BlockJob]) -> None:
    """An on-disk index's blocks filled by Ray tasks in parallel (`ondisk.fill_block`, one
    core each, at most one task a CPU in flight, so the driver holds that many chunks); the
    store merges them on the driver. The trained index and the blocks are files in the
    generation being written: on a cluster the index folder is on shared storage (README)."""
    import ray

    task = ray.remote(num_cpus=1)(fill_block)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    try:
        for job in jobs:
            if len(pending) >= slots:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
            pending.append(task.remote(trained, job.vectors, job.ids, job.out, threads=1))
        ray.get(pending)
    except ray.exceptions.RayError as error:
        cause = str(error).strip().splitlines()
        raise EngineError(f"filling the index's lists on Ray failed: "
                          f"{cause[-1] if cause else error!r}") from None


def import_on_ray(folder: Path, out: Path, model: ModelIdentity | ExternalModel,
                  config: BuildConfig = DEFAULT_CONFIG, ray_config: RayConfig = DEFAULT_RAY,
                  progress: ProgressFactory | None = None,
                  media_roots: Sequence[Path] = ()) -> Summary:
    """`build_from_embeddings` with an on-disk index's lists filled on Ray (nothing is
    encoded, so only that step runs there)."""
    with ray_session(ray_config):
        return build_from_embeddings(folder, out, model, config, progress,
                                     fill_blocks=fill_on_ray, media_roots=media_roots)


class RayJob(Job):
    """A `Job` whose pending shards are encoded by a Ray Data pipeline."""

    ENGINE = "ray"
    WORK = ParquetJobFolder

    def __init__(self, out: Path, identity: ModelIdentity, collection: Collection,
                 config: BuildConfig, parent: str | None, *, model: ModelSpec,
                 ray_config: RayConfig):
        super().__init__(out, identity, collection, config, parent)
        self.model, self.ray_config = model, ray_config
        self.fingerprint = identity.sha256  # every actor's model must have it

    def store_options(self) -> StoreOptions:
        return self.config.store_options(fill_on_ray)

    def _encode(self, todo: dict[str, list[int]], clip: ClipModel, bars: dict[str, Bar]
                ) -> dict[str, dict[int, Shard]]:
        """Run one pipeline over the pending images and texts, writing each shard once all
        its rows are back."""
        import ray

        sinks = {prefix: _ShardSink(self, prefix, positions) for prefix, positions in todo.items()}
        try:
            if any(todo.values()):
                for batch in self._pipeline(todo, clip).iter_batches(batch_size=None,
                                                                     batch_format="numpy"):
                    for prefix, sink in sinks.items():
                        bars[prefix].update(sink.add(batch))
        except ray.exceptions.RayError as error:  # the shards written so far stay: resumable
            cause = str(error).strip().splitlines()
            raise EngineError(f"the Ray pipeline failed: {cause[-1] if cause else error!r}; "
                              "shards written so far are kept for a rerun") from None
        return {prefix: sink.finish() for prefix, sink in sinks.items()}

    def _pipeline(self, todo: dict[str, list[int]], clip: ClipModel) -> Any:
        """listing -> decode tasks -> encoder actors, as a lazy Ray dataset."""
        import ray

        transform = image_transform(clip.preprocess)
        shape, dtype = pixel_shape(transform)
        limits = decode_limits(clip.preprocess, self.config.max_pixels)
        gpus = self.ray_config.gpus_per_encoder
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        # A decode task reserves what one decode may allocate; its resources differing from
        # the encoders', Ray Data keeps decoding in tasks instead of fusing it into the actors
        decoded = self._listing(todo).map_batches(
            decode_rows, batch_size=self.config.batch_size, batch_format="numpy", num_cpus=1,
            memory=WORKER_BYTES + limits.max_bytes,
            fn_kwargs={"transform": transform, "limits": limits})
        return decoded.map_batches(
            EncodingActor, batch_format="numpy", batch_size=self.config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=self.ray_config.num_encoders),
            num_gpus=gpus, num_cpus=self.ray_config.cpus_per_encoder,
            fn_constructor_kwargs={"model": self.model, "fingerprint": self.fingerprint,
                                   "precision": self.config.precision, "gpus": gpus,
                                   "shape": shape, "dtype": dtype})

    def _listing(self, todo: dict[str, list[int]]) -> Any:
        """One row per pending input (images, then texts), in blocks of a batch so decoding
        spreads over the CPUs. An image row names its file, or its tar and byte range."""
        import pyarrow as pa
        import ray

        sources = [self.collection.images[p].source for p in todo["images"]]
        members = [s if isinstance(s, TarMember) else None for s in sources]
        texts = [self.texts[p][0] for p in todo["texts"]]
        blank = [""] * len(texts)
        table = pa.table({
            "position": todo["images"] + todo["texts"],
            "prefix": ["images"] * len(sources) + ["texts"] * len(texts),
            "file": [str(m.archive if m else s) for m, s in zip(members, sources)] + blank,
            "member": [m.name if m else "" for m in members] + blank,
            "offset": [m.offset if m else -1 for m in members] + [-1] * len(texts),
            "size": [m.size if m else -1 for m in members] + [-1] * len(texts),
            "text": [""] * len(sources) + texts})
        step = self.config.batch_size
        return ray.data.from_arrow([table.slice(start, step)
                                    for start in range(0, len(table), step)])

    def _flush(self, prefix: str, shard: int, kept: list[tuple[int, np.ndarray]],
               problems: list[tuple[int, Skipped]]) -> Shard:
        """Write a shard with each row's item metadata beside its embedding."""
        if prefix == "images":
            def metadata(p: int) -> dict[str, Any]:
                return self.collection.images[p].metadata
        else:
            def metadata(p: int) -> dict[str, Any]:
                return self.texts[p][1]
        written = self.work.save(prefix, shard, kept, problems, metadata=metadata)
        self.encoded += 1
        return written


class _ShardSink:
    """Gathers encoded rows, which come back in any order, and writes each shard as soon as
    every one of its inputs is back (kept or skipped)."""

    def __init__(self, job: RayJob, prefix: str, todo: list[int]):
        self.job, self.prefix, self.size = job, prefix, job.config.shard_size
        self.expected: dict[int, int] = defaultdict(int)
        for position in todo:
            self.expected[position // self.size] += 1
        self.kept: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
        self.problems: dict[int, list[tuple[int, Skipped]]] = defaultdict(list)
        self.written: dict[int, Shard] = {}

    def add(self, batch: Batch) -> int:
        """Take this sink's rows of `batch`; returns how many there were."""
        mine = np.flatnonzero(batch["prefix"] == self.prefix)
        for row in mine.tolist():
            position, error = int(batch["position"][row]), str(batch["error"][row])
            vector, path = batch["embedding"][row], str(batch["path"][row])
            shard = position // self.size
            if error:
                self.problems[shard].append((position, Skipped(path, error)))
            else:
                self.kept[shard].append((position, np.asarray(vector, np.float32)))
            if len(self.kept[shard]) + len(self.problems[shard]) == self.expected[shard]:
                self.written[shard] = self.job._flush(self.prefix, shard, self.kept.pop(shard),
                                                      self.problems.pop(shard))
        return len(mine)

    def finish(self) -> dict[int, Shard]:
        missing = sorted(set(self.expected) - set(self.written))
        if missing:
            raise IndexStoreError(f"Ray returned only part of {self.prefix} shard {missing[0]} "
                                  "(rows lost); run the build again to encode the rest")
        return self.written


def image_transform(preprocess: Callable) -> Callable:
    """The decode tasks' half of `preprocess`: up to uint8 pixels when it ends in ToTensor +
    Normalize (the encoder normalises, as in the single-process path), else all of it."""
    from retrieval.inputs.tensors import split_tensor_tail

    split = split_tensor_tail(preprocess)
    return split[0] if split else preprocess


def pixel_shape(transform: Callable) -> tuple[tuple[int, ...], str]:
    """The (3, H, W) shape and dtype every image comes out of `transform` with (open_clip
    crops to a square)."""
    from PIL import Image

    probe = transform(Image.new("RGB", (256, 256))).numpy()
    return tuple(probe.shape), str(probe.dtype)


def _source(batch: Batch, row: int) -> ImageFile:
    if int(batch["offset"][row]) < 0:
        return Path(str(batch["file"][row]))
    return TarMember(Path(str(batch["file"][row])), str(batch["member"][row]),
                     int(batch["offset"][row]), int(batch["size"][row]))


def decode_rows(batch: Batch, transform: Callable, limits: Any) -> Batch:
    """A Ray task: decode the image rows of a batch of listing rows to their pixels' bytes
    (texts pass through with none); a row that cannot be decoded has its reason in `error`
    (never an exception). It runs at DECODE_NICENESS: decoding fills the gaps of an encoder
    that spreads over the node's cores, as the single-process pipeline's workers do."""
    if os.nice(0) < DECODE_NICENESS:
        os.nice(DECODE_NICENESS - os.nice(0))
    count = len(batch["position"])
    pixels, errors, paths = [b""] * count, [""] * count, [""] * count
    for row in np.flatnonzero(batch["prefix"] == "images").tolist():
        source = _source(batch, row)
        paths[row] = str(source)
        tensor, reason = decode_image(source, transform, limits)
        if tensor is None:
            errors[row] = str(reason)
        else:
            pixels[row] = tensor.numpy().tobytes()
    return {"position": batch["position"], "prefix": batch["prefix"], "text": batch["text"],
            "pixels": np.array(pixels, dtype=object), "error": np.array(errors, dtype=object),
            "path": np.array(paths, dtype=object)}


def _use_the_nodes_cores() -> None:
    """Ray gives an actor of one CPU one torch thread; a CPU encoder whose every op waits
    for its threads is faster on all the node's cores, the decode tasks at low priority in
    its gaps (what the single-process pipeline does). ONNX Runtime sessions size themselves
    by the same `cores()`."""
    import torch

    from retrieval.models.onnx import cores

    torch.set_num_threads(cores())


class EncodingActor:
    """A Ray actor: loads the model once, then encodes the decoded images and the texts of
    each batch with the single-process path's batch functions."""

    def __init__(self, model: ModelSpec, fingerprint: str, precision: str, gpus: float,
                 shape: tuple[int, ...], dtype: str):
        from retrieval.models.loading import load_model

        device = "cpu" if model.device == "auto" and not gpus else model.device
        if device == "cpu":
            _use_the_nodes_cores()
        self.clip = load_model(model.name, device, backend=model.backend)
        found = model_identity(self.clip).sha256
        if found != fingerprint:
            raise IndexMismatchError(
                f"the encoder on {socket.gethostname()} loaded {model.name} with sha256 "
                f"{found[:12]}, the driver's has {fingerprint[:12]}: every node must see the "
                "same model files")
        self.precision, self.shape, self.dtype = precision, shape, np.dtype(dtype)

    def __call__(self, batch: Batch) -> Batch:
        """(n,) rows -> the same rows with an (n, d) `embedding` (zeros where `error`)."""
        import torch

        from retrieval.models.inference import encode_image_batch, encode_texts

        embedding = np.zeros((len(batch["position"]), self.clip.embed_dim), np.float32)
        images = np.flatnonzero((batch["prefix"] == "images") & (batch["error"] == ""))
        if len(images):
            pixels = np.stack([np.frombuffer(batch["pixels"][row], self.dtype).reshape(self.shape)
                               for row in images.tolist()])  # (m, 3, H, W)
            embedding[images] = encode_image_batch(self.clip, torch.from_numpy(pixels),
                                                   self.precision)
        texts = np.flatnonzero(batch["prefix"] == "texts")
        if len(texts):
            embedding[texts] = encode_texts(self.clip, [str(batch["text"][row]) for row in texts],
                                            precision=self.precision)
        return {"position": batch["position"], "prefix": batch["prefix"], "embedding": embedding,
                "error": batch["error"], "path": batch["path"]}
