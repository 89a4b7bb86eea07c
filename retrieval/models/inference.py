"""Batched image and text encoding: plain functions from a batch of inputs to (n, d) float32.

Each `*_batch` function maps one batch to L2-normalised embeddings and has no other state,
so it can serve a DataLoader loop here or a Ray Data `map_batches` actor elsewhere.

The batch functions are the one seam between the torch and ONNX Runtime backends: a model
loaded with `backend="onnx"` carries ONNX Runtime sessions of its towers (`clip.onnx`, see
retrieval/models/onnx.py), and fp32 calls go to them, so every caller (the indexer, the
service's batchers, evaluation) gets that backend without knowing it. A reduced precision
(fp16, bf16) is torch autocast, so such calls run torch either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from retrieval.inputs.images import (
    DEFAULT_MAX_PIXELS,
    DecodeLimits,
    ImageInput,
    draft_side_of,
    load_image,
)
from retrieval.inputs.tensors import normalise_uint8, split_tensor_tail
from retrieval.models.choices import PRECISIONS
from retrieval.models.clip import ClipModel, Towers
from retrieval.models.text import text_features, text_trims, trim_padding


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA by default; fp32 on CPU unless bf16 is asked for."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy()


def _onnx_towers(clip: ClipModel, precision: str) -> Towers | None:
    """The model's ONNX Runtime towers when they serve a call at `precision`, else None."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return clip.onnx if precision in ("auto", "fp32") else None


def encode_image_batch(clip: ClipModel, pixels: torch.Tensor, precision: str = "auto") -> np.ndarray:
    """(n, 3, H, W) preprocessed pixels -> (n, d) unit-norm float32 embeddings.

    uint8 pixels (from `iter_image_batches(..., uint8=True)`) are normalised here, after the
    copy to the device, so a GPU receives a quarter of the bytes."""
    towers = _onnx_towers(clip, precision)
    if towers is not None:
        return _normalised(torch.from_numpy(towers.image(_float_pixels(clip, pixels))))
    non_blocking = clip.device.type == "cuda"
    pixels = pixels.to(clip.device, non_blocking=non_blocking)
    pixels = _float_pixels(clip, pixels)
    if clip.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_for(clip.device, precision):
        features = clip.model.encode_image(pixels)
    return _normalised(features)


def _float_pixels(clip: ClipModel, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised float pixels, from uint8 ones when given those (same device)."""
    if pixels.dtype != torch.uint8:
        return pixels
    split = split_tensor_tail(clip.preprocess)
    if split is None:
        raise ValueError("uint8 pixels need a preprocess ending in ToTensor, Normalize")
    return normalise_uint8(pixels, split[1], split[2])


def text_forward(clip: ClipModel, tokens: torch.Tensor, trim: bool = True) -> torch.Tensor:
    """(n, L) token ids -> (n, d) unnormalised features, at the batch's real length when
    `trim`; differentiable, so training uses it too."""
    trimmed = trim_padding(tokens, clip.pad_token_id) if trim else tokens
    if trimmed.shape[1] == tokens.shape[1] or not text_trims(clip.model):
        return clip.model.encode_text(tokens.to(clip.device))
    return text_features(clip.model, trimmed.to(clip.device))


def encode_token_batch(clip: ClipModel, tokens: torch.Tensor, precision: str = "auto",
                       trim: bool = True) -> np.ndarray:
    """(n, L) token ids -> (n, d) unit-norm float32 embeddings."""
    towers = _onnx_towers(clip, precision)
    if towers is not None:
        if trim and towers.dynamic_length:
            tokens = trim_padding(tokens, clip.pad_token_id)
        return _normalised(torch.from_numpy(towers.text(tokens)))
    with torch.inference_mode(), autocast_for(clip.device, precision):
        features = text_forward(clip, tokens, trim)
    return _normalised(features)


def _batches(count: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


def encode_texts(clip: ClipModel, texts: Sequence[str], batch_size: int = 256,
                 precision: str = "auto", trim: bool = True) -> np.ndarray:
    """Encode texts to (n, d); texts are sorted by length so each batch trims tightly."""
    if len(texts) == 0:
        return np.zeros((0, clip.embed_dim), dtype=np.float32)
    tokens = clip.tokenizer(list(texts))
    lengths = (tokens != clip.pad_token_id).sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True) if trim else torch.arange(len(texts))
    out = np.empty((len(texts), clip.embed_dim), dtype=np.float32)
    for part in _batches(len(texts), batch_size):
        rows = order[part]
        out[rows.numpy()] = encode_token_batch(clip, tokens[rows], precision, trim)
    return out


def encode_images(clip: ClipModel, images: Sequence[ImageInput], batch_size: int = 64,
                  precision: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encode paths or PIL images to (n, d); a bad image raises BadImageError naming it.

    For large corpora use the indexer, which decodes in worker processes and skips bad files.
    """
    if len(images) == 0:
        return np.zeros((0, clip.embed_dim), dtype=np.float32)
    out = np.empty((len(images), clip.embed_dim), dtype=np.float32)
    limits = DecodeLimits(max_pixels=max_pixels, draft_side=draft_side_of(clip.preprocess))
    for part in _batches(len(images), batch_size):
        pixels = torch.stack([clip.preprocess(load_image(item, limits=limits))
                              for item in images[part]])
        out[part] = encode_image_batch(clip, pixels, precision)
    return out
