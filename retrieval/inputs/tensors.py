"""From a decoded image to the model's input tensor without torchvision's per-image float
work: the tail of a preprocess (ToTensor, Normalize) is split off so workers ship uint8
pixels and the normalisation runs once per batch, on the device that encodes it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.errors import BadImageError


def split_tensor_tail(preprocess: Any) -> tuple[Callable, tuple[float, ...], tuple[float, ...]] | None:
    """Split an open_clip-style `Compose([..PIL steps.., ToTensor, Normalize])` into
    (PIL steps followed by a uint8 CHW tensor, mean, std); None for any other shape.

    Decoding workers then ship uint8 (a quarter of the bytes through shared memory) and
    skip the per-image float conversion, which cost as much as the resize; the batch is
    converted and normalised in one vectorised step where it is encoded (on the GPU there).
    When the PIL steps are open_clip's usual resize and centre crop, they run on the uint8
    tensor instead (`_tensor_steps`).
    """
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    normalize = steps[-1]
    if type(normalize).__name__ != "Normalize":
        return None
    head = steps[:-2]
    on_tensor = _tensor_steps(head)

    def to_uint8(image: Image.Image) -> torch.Tensor:
        if on_tensor is not None and image.mode == "RGB":
            pixels = _chw(image)
            for step in on_tensor:
                pixels = step(pixels)
            return pixels.contiguous()
        for step in head:
            image = step(image)
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise BadImageError(f"preprocessing gave {type(image).__name__} "
                                f"{getattr(image, 'mode', '')}, expected an RGB image")
        return _chw(image)

    return to_uint8, tuple(map(float, normalize.mean)), tuple(map(float, normalize.std))


def _chw(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) uint8 tensor that owns its pixels."""
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _tensor_steps(head: Sequence[Any]) -> list[Callable] | None:
    """PIL steps that torchvision runs the same way on a uint8 tensor (bicubic or bilinear
    antialiased resize, centre crop; an RGB conversion is a no-op on an RGB image), else
    None. torchvision's v2 uint8 resize is vectorised: 0.55 ms for a 512-pixel photograph
    where Pillow's bicubic takes 2-3 ms, the largest cost of decoding a PNG after inflating
    it. Pixels differ from Pillow's by a rounding, embeddings by a cosine above 0.9999
    (tests/retrieval/test_pipeline.py)."""
    from torchvision import transforms
    from torchvision.transforms.v2 import functional

    modes = (transforms.InterpolationMode.BICUBIC, transforms.InterpolationMode.BILINEAR)
    steps: list[Callable] = []
    for step in head:
        if type(step).__name__ == "MaybeConvertMode" and getattr(step, "mode", "") == "RGB":
            continue
        if isinstance(step, transforms.Resize) and step.interpolation in modes \
                and step.antialias is not False:
            steps.append(functools.partial(functional.resize, size=step.size,
                                           interpolation=step.interpolation,
                                           max_size=step.max_size, antialias=True))
        elif isinstance(step, transforms.CenterCrop):
            steps.append(functools.partial(functional.center_crop, output_size=step.size))
        else:
            return None
    return steps


def normalise_uint8(pixels: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> float32, exactly as ToTensor then Normalize would compute it."""
    import torch

    values = pixels.float().div_(255)
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=values.dtype, device=values.device).view(shape)
    std_t = torch.as_tensor(std, dtype=values.dtype, device=values.device).view(shape)
    return values.sub_(mean_t).div_(std_t)
