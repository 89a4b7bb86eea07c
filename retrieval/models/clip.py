"""A loaded dual encoder (`ClipModel`) and the interface of the towers that may stand in for
its torch modules (`Towers`).

This module is a leaf: the loaders (`loading`), the ONNX Runtime backend (`onnx`) and the
inference functions (`inference`) all build on it and none of them on each other's types, so
the backend is an object the model holds, not an import the encoding functions make.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image


class Towers(Protocol):
    """Image and text towers that run outside torch (today ONNX Runtime): raw, unnormalised
    features from preprocessed float pixels or token ids."""

    dynamic_length: bool  # the text tower takes batches trimmed of their padding

    def image(self, pixels: torch.Tensor) -> np.ndarray: ...

    def text(self, tokens: torch.Tensor) -> np.ndarray: ...


@dataclass
class ClipModel:
    """Everything needed to turn images and texts into embeddings with one model."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    arch: str
    embed_dim: int
    pad_token_id: int
    init: str  # how the non-saved weights are rebuilt: "towers", "random" or "openclip:ARCH:TAG"
    config: dict[str, Any]
    card: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False  # image tower in NHWC: feed it pixels in that layout
    source: Path | None = None  # the checkpoint file it was loaded from, if any
    backend: str = "torch"  # what encodes: "torch", or "onnx" (ONNX Runtime, `onnx` below)
    onnx: Towers | None = None  # the towers' ONNX Runtime sessions (retrieval/models/onnx.py)
