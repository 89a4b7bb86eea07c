"""Image decoding that turns whatever Pillow can open into a safe, upright RGB image."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from retrieval.errors import BadImageError

DEFAULT_MAX_PIXELS = 50_000_000
ImageInput = str | Path | Image.Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an upright 8-bit RGB copy of `image`.

    `Image.convert("RGB")` alone is wrong for several modes: it drops alpha onto black,
    clips 16-bit and float images instead of scaling them, and ignores EXIF orientation.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _scale_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Map a high-bit-depth grey image to 0..255 by its nominal range."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F":
        top = 1.0 if pixels.max(initial=0.0) <= 1.0 else float(pixels.max())
    else:  # 32-bit integer: use the range actually present
        top = float(max(pixels.max(initial=0.0), 1.0))
    scaled = np.clip(pixels / top * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled)  # uint8 (h, w) -> mode "L"


def load_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, size-check and decode one image; raise BadImageError naming the file on failure.

    The pixel cap is checked from the header before decoding, and Pillow's decompression
    bomb warning is raised as an error so a crafted file cannot exhaust memory.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadImageError(
                        f"{path}: {width}x{height} is over the pixel cap of {max_pixels:,}"
                    )
                image.load()
                return to_rgb(image)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(f"{path}: decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"{path}: cannot decode image ({error})") from None


def split_tensor_tail(preprocess: Any) -> tuple[Callable, tuple[float, ...], tuple[float, ...]] | None:
    """Split an open_clip-style `Compose([..PIL steps.., ToTensor, Normalize])` into
    (PIL steps followed by a uint8 CHW tensor, mean, std); None for any other shape.

    Decoding workers then ship uint8 (a quarter of the bytes through shared memory) and
    skip the per-image float conversion, which cost as much as the resize; the batch is
    converted and normalised in one vectorised step where it is encoded (on the GPU there).
    """
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    normalize = steps[-1]
    if type(normalize).__name__ != "Normalize":
        return None
    head = steps[:-2]

    def to_uint8(image: Image.Image) -> torch.Tensor:
        for step in head:
            image = step(image)
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise BadImageError(f"preprocessing gave {type(image).__name__} "
                                f"{getattr(image, 'mode', '')}, expected an RGB image")
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    return to_uint8, tuple(map(float, normalize.mean)), tuple(map(float, normalize.std))


def normalise_uint8(pixels: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> float32, exactly as ToTensor then Normalize would compute it."""
    values = pixels.float().div_(255)
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=values.dtype, device=values.device).view(shape)
    std_t = torch.as_tensor(std, dtype=values.dtype, device=values.device).view(shape)
    return values.sub_(mean_t).div_(std_t)
