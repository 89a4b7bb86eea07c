"""What the running service holds: the model, the served generation (swappable without
dropping requests), the encoding batchers on their single model thread, and metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from api.errors import EXTERNAL_MODEL_HINT, redact_paths
from api.images import upload_limits
from api.metrics import Metrics
from api.settings import Settings
from retrieval.errors import ClipdexError
from retrieval.index import Index, external_of, open_index
from retrieval.inputs.images import draft_side_of
from retrieval.models.choices import MODALITIES
from retrieval.models.clip import ClipModel
from retrieval.models.identity import ModelIdentity, model_identity
from retrieval.models.inference import encode_image_batch, encode_texts
from retrieval.search.batcher import MicroBatcher
from retrieval.search.query_encoders import BatchedEncoder
from retrieval.search.searcher import GenerationLike
from retrieval.store import read_current, read_generation_manifest

log = logging.getLogger("api")
Result = TypeVar("Result")


@dataclass
class _Slot:
    index: Index
    users: int = 0
    retired: bool = False


class GenerationSlot:
    """The served Index. `swap` replaces it atomically; the old generation is closed when
    the last request that leased it is done, so in-flight searches never lose their index."""

    def __init__(self, index: Index):
        self._lock = threading.Lock()
        self._slot = _Slot(index)

    @property
    def current(self) -> Index:
        return self._slot.index

    @contextmanager
    def lease(self) -> Iterator[Index]:
        with self._lock:
            slot = self._slot
            slot.users += 1
        try:
            yield slot.index
        finally:
            with self._lock:
                slot.users -= 1
                finished = slot.retired and slot.users == 0
            if finished:
                slot.index.close()

    def swap(self, index: Index) -> Index:
        with self._lock:
            old, self._slot = self._slot, _Slot(index)
            old.retired = True
            finished = old.users == 0
        if finished:
            old.index.close()
        return old.index


def holds_external(root: Path | None, generation: GenerationLike | None) -> bool:
    """Whether the generation to serve (`generation`, else root's current one) was made by an
    external model, which clipdex cannot load: then loading its own model would only cost
    memory (about 1 GB for the default) until a generation needs it. False when root cannot be
    read: the model is loaded and opening the index reports why."""
    if generation is not None:
        return external_of(generation) is not None
    if root is None:
        return False
    try:
        return read_generation_manifest(Path(root)).model.external
    except ClipdexError:
        return False


class ServiceState:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.clip: ClipModel | None = None
        self.model: ModelIdentity | None = None  # what the index must have been built with
        self.slot: GenerationSlot | None = None
        self.load_error: str | None = None
        # One thread owns the model: batches from both batchers run there one at a time.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipdex-model")
        self.upload_limits = upload_limits(settings.max_image_pixels, settings.max_decode_bytes)
        self.text_batcher: MicroBatcher[str, np.ndarray] | None = None
        self.image_batcher: MicroBatcher[torch.Tensor, np.ndarray] | None = None
        self.encoder: BatchedEncoder | None = None
        # Searcher calls block their thread on the batchers: one thread per request in flight
        # (they wait, they do not compute), so batching is never capped by the pool.
        self.request_executor = ThreadPoolExecutor(
            max_workers=max(8, settings.max_in_flight or 64), thread_name_prefix="clipdex-req")
        self._reload_lock = asyncio.Lock()

    # --- lifecycle ---
    async def start(self, clip: ClipModel | None, generation: GenerationLike | None) -> None:
        """Load the model (not for an index of external embeddings: not until a generation
        needs it) and open the index; a failure leaves the service up, saying why."""
        try:
            index = self.settings.index
            if clip is not None or not await asyncio.to_thread(holds_external, index, generation):
                await self._load_model(clip)
            served = None
            if generation is not None:
                served = self._index(generation)
            elif index is not None:
                served = await asyncio.to_thread(self._open, index)
            if served is not None:
                self.slot = GenerationSlot(served)
                self._observe_counts()
        except ClipdexError as error:  # the service stays up and /readyz says why
            self.load_error = str(error)
            log.error("not ready: %s", error)

    async def _load_model(self, clip: ClipModel | None) -> None:
        if clip is None:
            from retrieval.models.loading import load_model

            clip = await asyncio.to_thread(load_model, self.settings.model,
                                           self.settings.device, self.settings.backend)
        self.clip = clip
        self.model = await asyncio.to_thread(model_identity, clip)
        self._start_batchers(clip, self.model)

    def _start_batchers(self, clip: ClipModel, model: ModelIdentity) -> None:
        config = self.settings.batching
        self.text_batcher = MicroBatcher(
            "text", lambda texts: list(encode_texts(clip, texts, batch_size=config.max_batch)),
            self.executor, config, self.metrics.on_batch)
        self.image_batcher = MicroBatcher(
            "image", lambda pixels: list(encode_image_batch(clip, torch.stack(pixels))),
            self.executor, config, self.metrics.on_batch)
        for batcher in (self.text_batcher, self.image_batcher):
            batcher.start()
            self.metrics.watch_queue(batcher.name, lambda b=batcher: b.depth)
        self.upload_limits = upload_limits(self.settings.max_image_pixels,
                                           self.settings.max_decode_bytes,
                                           draft_side_of(clip.preprocess))
        self.encoder = BatchedEncoder(
            clip, self.text_batcher, self.image_batcher, asyncio.get_running_loop(),
            self.upload_limits, self.settings.max_concurrent_decodes,
            wave=min(config.max_batch, config.queue_size), model_sha256=model.sha256,
            decode_deadline_s=self.settings.decode_deadline_s)

    def _open(self, root: Path) -> Index:
        """Root's current generation with the service's encoder (an index of external
        embeddings needs none; any other needs the model loaded)."""
        if self.encoder is None and not holds_external(root, None):
            raise ClipdexError(self.load_error or "the model is not loaded")
        return open_index(root, self.encoder, query_seconds=self.settings.query_seconds,
                          max_depth=self.settings.max_depth, follow_writes=False)

    def _index(self, generation: GenerationLike) -> Index:
        """A generation handed in (tests, tools) served like one opened from the root."""
        return Index(self.settings.index, generation, self.encoder, self.settings.max_depth,
                     self.settings.query_seconds, follow_writes=False)

    async def run(self, call: Callable[..., Result], *args: Any) -> Result:
        """`call(*args)` on a request thread: Searcher calls block while the batchers work."""
        return await asyncio.get_running_loop().run_in_executor(
            self.request_executor, functools.partial(call, *args))

    async def stop(self) -> None:
        for batcher in (self.text_batcher, self.image_batcher):
            if batcher is not None:
                await batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.request_executor.shutdown(wait=False, cancel_futures=True)
        if self.encoder is not None:
            self.encoder.close()

    # --- generations ---
    def ready_problem(self) -> str | None:
        """Why the service cannot answer searches, or None when it can (said to clients, so
        without the server's paths)."""
        external = self.slot is not None and external_of(self.slot.current.generation)
        if self.clip is None and not external:
            return redact_paths(self.load_error or "the model is not loaded yet")
        if self.slot is None:
            return redact_paths(self.load_error or "no index generation is loaded; start with "
                                "--index DIR")
        if not external and self.clip.embed_dim != self.slot.current.embed_dim:
            return (f"model embed_dim {self.clip.embed_dim} != index embed_dim "
                    f"{self.slot.current.embed_dim}")
        return None

    async def reload(self, generation: GenerationLike | None = None) -> tuple[str | None, str]:
        """Serve the index root's current generation (or `generation`); (previous, new) names."""
        async with self._reload_lock:
            previous = self.slot.current.generation.name if self.slot else None
            if generation is None:
                if self.settings.index is None:
                    raise ClipdexError("this service was started without --index; nothing to "
                                       "reload")
                await self._model_for(self.settings.index, None)
                served = await asyncio.to_thread(self._open, self.settings.index)
            else:
                await self._model_for(None, generation)
                served = self._index(generation)
            if previous is not None and served.name == previous:
                served.close()
                return previous, previous
            if self.slot is None:
                self.slot = GenerationSlot(served)
            else:
                self.slot.swap(served)
            self.load_error = None
            self.metrics.reloads.inc()
            self._observe_counts()
            log.info("serving generation %s (was %s)", served.name, previous)
            return previous, served.name

    async def _model_for(self, root: Path | None, generation: GenerationLike | None) -> None:
        """Load the model now if the next generation needs it and it was never loaded (the
        service started on an index of external embeddings)."""
        if self.model is None and not await asyncio.to_thread(holds_external, root, generation):
            await self._load_model(None)

    def current_name_on_disk(self) -> str | None:
        """The generation the index root points at now (for --watch), without opening it."""
        if self.settings.index is None:
            return None
        return read_current(Path(self.settings.index))

    def _observe_counts(self) -> None:
        if self.slot is None:
            return
        generation = self.slot.current.generation
        for modality in MODALITIES:
            self.metrics.index_items.labels(modality).set(generation.count(modality))

    def describe(self) -> dict[str, Any]:
        """What /readyz reports: the model and generation served, and the queries they answer
        (an index of external embeddings answers vectors and item ids only, and says why)."""
        assert self.slot is not None
        info = self.slot.current.info()
        if info.get("external_model"):
            info["note"] = f"{info['note']}; {EXTERNAL_MODEL_HINT}"
        return info
