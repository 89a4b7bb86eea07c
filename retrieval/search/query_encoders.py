"""The one interface a `Searcher` needs from a model: texts or images in, `(n, d)` float32
L2-normalised embeddings out.

`ModelEncoder` calls the model directly (a notebook, a script, the CLI). `BatchedEncoder`
sends every input through the micro-batchers running on an event loop, so that concurrent
callers (the service's request threads) share model calls; it blocks its caller's thread, and
must not be called from the loop's own thread. `UnavailableEncoder` stands in for a model the
index needs and nobody can load (embeddings made elsewhere): texts and images raise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from retrieval.errors import ExternalModelError, ImageTooLargeError
from retrieval.inputs.images import DecodeLimits, draft_side_of, model_pixels
from retrieval.models.clip import ClipModel
from retrieval.models.identity import model_fingerprint
from retrieval.models.inference import encode_image_batch, encode_texts
from retrieval.search.batcher import MicroBatcher
from retrieval.search.calibration import DIRECTIONS, Calibration, calibration_of

ImageLike = bytes | Image.Image  # an encoded file, or a decoded image


class QueryEncoder(Protocol):
    embed_dim: int
    # the fingerprint an index built with this model records (None: no model is loaded), so a
    # Searcher refuses an index built with other weights instead of answering nonsense
    model_sha256: str | None
    logit_scale: float  # the model's softmax scale for zero-shot classification
    calibrations: dict[str, Calibration]  # direction ("text_to_image", ...) -> relevance fit

    def texts(self, texts: Sequence[str]) -> np.ndarray: ...  # (n, d)
    def images(self, images: Sequence[ImageLike]) -> np.ndarray: ...  # (n, d)


def model_calibrations(clip: ClipModel) -> dict[str, Calibration]:
    """The relevance fits the model's card holds (retrieval.search.calibration), by direction."""
    fits = {d: calibration_of(clip.card, d) for d in DIRECTIONS}
    return {direction: fit for direction, fit in fits.items() if fit is not None}


def model_logit_scale(clip: ClipModel) -> float:
    """exp of the model's learnt log-scale (100 for OpenAI CLIP), capped like training does."""
    raw = getattr(clip.model, "logit_scale", None)  # open_clip models without one: CLIP's 100
    value = float(raw.detach().float().exp().item()) if raw is not None else 100.0
    return min(value, 100.0)


class ModelEncoder:
    """Encodes on the calling thread, one model call per method call. Made once per model:
    it takes the model's fingerprint, which hashes the weights of a model without a card."""

    def __init__(self, clip: ClipModel, limits: DecodeLimits | None = None):
        self.clip = clip
        self.limits = limits or DecodeLimits(draft_side=draft_side_of(clip.preprocess))
        self.embed_dim = int(clip.embed_dim)
        self.model_sha256: str | None = model_fingerprint(clip)
        self.logit_scale = model_logit_scale(clip)
        self.calibrations = model_calibrations(clip)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return encode_texts(self.clip, list(texts))

    def images(self, images: Sequence[ImageLike]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        pixels = [model_pixels(image, self.clip.preprocess, self.limits) for image in images]
        return encode_image_batch(self.clip, torch.stack(pixels))  # (n, 3, H, W) -> (n, d)


class UnavailableEncoder:
    """The encoder of an index whose model clipdex cannot load: a Searcher over it answers
    vector and item queries, and every text or image raises ExternalModelError(`reason`)."""

    logit_scale = 100.0  # never used: classification needs images encoded first
    model_sha256 = None  # the index's model is not loaded: nothing to compare

    def __init__(self, embed_dim: int, reason: str):
        self.embed_dim, self.reason = int(embed_dim), reason
        self.calibrations: dict[str, Calibration] = {}

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        raise ExternalModelError(self.reason)

    def images(self, images: Sequence[ImageLike]) -> np.ndarray:
        raise ExternalModelError(self.reason)


class BatchedEncoder:
    """Submits inputs to the text and image MicroBatchers on `loop`.

    Images are decoded on `decode_slots` threads of their own: with the decoder's byte cap
    that bounds the memory hostile uploads can take, and their CPU. A call's images must be
    decoded within `decode_deadline_s`, else ImageTooLargeError: the caller is answered at
    the deadline and the decode running then is abandoned, not waited for (it keeps its
    slot until it ends; the decoder's work caps bound how long), and those not yet started
    are cancelled. Long lists go to the batcher `wave` inputs at a time, so one request
    cannot fill the queue by itself. `model_sha256` is the model's fingerprint, which its
    owner has already computed."""

    def __init__(self, clip: ClipModel, text_batcher: MicroBatcher, image_batcher: MicroBatcher,
                 loop: asyncio.AbstractEventLoop, limits: DecodeLimits, decode_slots: int,
                 wave: int, model_sha256: str, decode_deadline_s: float = 2.0):
        self.clip, self.loop, self.limits, self.wave = clip, loop, limits, wave
        self.model_sha256: str | None = model_sha256
        self.text_batcher, self.image_batcher = text_batcher, image_batcher
        self.decodes = ThreadPoolExecutor(decode_slots, thread_name_prefix="clipdex-decode")
        self.decode_deadline_s = decode_deadline_s
        self.embed_dim = int(clip.embed_dim)
        self.logit_scale = model_logit_scale(clip)
        self.calibrations = model_calibrations(clip)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._through(self.text_batcher, list(texts))

    def images(self, images: Sequence[ImageLike]) -> np.ndarray:
        return self._through(self.image_batcher, self.decoded(images))

    def decoded(self, images: Sequence[ImageLike]) -> list[torch.Tensor]:
        """Each image decoded and preprocessed on a decode thread, all by the deadline."""
        deadline = time.monotonic() + self.decode_deadline_s
        jobs = [self.decodes.submit(model_pixels, image, self.clip.preprocess, self.limits)
                for image in images]
        try:
            return [job.result(timeout=max(deadline - time.monotonic(), 0.0)) for job in jobs]
        except FutureTimeout:
            raise ImageTooLargeError(
                f"decoding the request's {len(jobs)} image(s) took over "
                f"{self.decode_deadline_s:g} s; send smaller or simpler images") from None
        finally:
            for job in jobs:
                job.cancel()  # a no-op for those done or running

    def close(self) -> None:
        """Stop the decode threads (a running decode finishes on its own)."""
        self.decodes.shutdown(wait=False, cancel_futures=True)

    def _through(self, batcher: MicroBatcher, inputs: list) -> np.ndarray:
        if _running_loop() is self.loop:
            raise RuntimeError("BatchedEncoder blocks; call it from a worker thread")
        vectors: list[np.ndarray] = []
        for start in range(0, len(inputs), self.wave):
            wave = inputs[start:start + self.wave]
            vectors += asyncio.run_coroutine_threadsafe(_gather(batcher, wave), self.loop).result()
        if not vectors:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.stack(vectors).astype(np.float32, copy=False)


async def _gather(batcher: MicroBatcher, inputs: list) -> list[np.ndarray]:
    return list(await asyncio.gather(*(batcher.submit(item) for item in inputs)))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
