"""The one decoder of untrusted images (files for the indexer, uploads for the service): it
turns whatever Pillow can open into a safe, upright 8-bit RGB image at a bounded cost."""

from __future__ import annotations

import functools
import io
import mmap
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from retrieval.errors import BadImageError, ImageTooLargeError, UnsupportedImageError
from retrieval.fields.values import parse_datetime
from retrieval.heap import release_freed_memory
from retrieval.inputs.imagecost import Structure, coefficient_bytes, inspect, webp_canvas_bytes

if TYPE_CHECKING:  # torch is imported where tensors are made: decoding alone needs none
    import torch

DEFAULT_MAX_PIXELS = 50_000_000
# Peak bytes one decode may allocate: the decoded raster plus its RGB conversion. Pillow keeps
# 3- and 4-band images at 4 bytes a pixel, so a 50 MP RGB photograph costs 400 MB.
DEFAULT_MAX_DECODE_BYTES = 512 * 1024 * 1024
ImageInput = str | Path | Image.Image
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_BAND_ROWS = 256  # high-bit-depth images are scaled this many rows at a time
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one image may cost; checked from the header, before any pixel is read."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES  # decoded raster + every conversion's copy
    formats: tuple[str, ...] | None = None  # accepted Pillow formats; None: any
    # The shortest side the model needs (draft_side_of(preprocess)): a JPEG is decoded at the
    # smallest DCT scale (1/2, 1/4, 1/8) that keeps it at least this big. 5x faster on 12 MP
    # photographs; embeddings within cosine 0.997 of a full decode (tests/retrieval).
    draft_side: int | None = None
    # Decode work (`retrieval.inputs.imagecost`): a multi-scan JPEG is decoded once per scan over
    # the whole image. Encoders' standard progressions use 6-10 scans; a scan over 1 MP of a
    # flat image costs about 1 ms here, so scans x pixels under 600M keeps a decode near
    # half a second of CPU. Animated WebP and PNG name their frames (the first is decoded).
    max_scans: int = 100
    max_scan_pixels: int = 600_000_000
    max_frames: int = 1000


def decode_cost(mode: str, width: int, height: int) -> int:
    """Bytes a decode of this header allocates at its peak: the raster as Pillow stores it,
    plus the 8-bit grey band (high-bit-depth modes), plus the RGB copy (two for alpha, which
    is composited onto a white canvas)."""
    pixels = width * height
    rgb_copies = 2 if mode in _ALPHA_MODES or mode == "P" else 1
    grey = 1 if mode in _HIGH_BIT_MODES else 0
    return pixels * (_STORED_BYTES.get(mode, 4) + grey + 4 * rgb_copies)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an upright 8-bit RGB copy of `image`.

    `Image.convert("RGB")` alone is wrong for several modes: it drops alpha onto black,
    clips 16-bit and float images instead of scaling them, and ignores EXIF orientation.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _HIGH_BIT_MODES:
        image = _scale_to_8bit(image)
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Map a high-bit-depth grey image to 0..255 by its nominal range, a band of rows at a
    time in float32, so no full-size wide copy is ever made (a 40 MP 16-bit PNG would need
    1.2 GB as float64)."""
    _low, high = image.getextrema()
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F":
        top = 1.0 if high <= 1.0 else float(high)
    else:  # 32-bit integer: use the range actually present
        top = float(max(high, 1))
    out = Image.new("L", image.size)
    width, height = image.size
    for y in range(0, height, _BAND_ROWS):
        band = np.asarray(image.crop((0, y, width, min(height, y + _BAND_ROWS))),
                          dtype=np.float32)
        band *= np.float32(255.0 / top)
        scaled = np.clip(band, 0, 255, out=band).round(out=band).astype(np.uint8)
        out.paste(Image.fromarray(scaled), (0, y))
    return out


def load_image(source: ImageInput | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               limits: DecodeLimits | None = None, name: str | None = None) -> Image.Image:
    """Open, cost-check and decode one image (a path, or the bytes of an upload); raise
    BadImageError naming the file (or `name`, or "the image", for bytes) on failure.

    Pixels and decode bytes are checked from the header before decoding, and Pillow's
    decompression bomb warning is raised as an error, so a crafted file cannot exhaust memory.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    limits = limits or DecodeLimits(max_pixels=max_pixels)
    name = name or ("the image" if isinstance(source, bytes) else str(source))
    try:
        with _open(source, limits, name) as (image, extra):
            _draft(image, limits.draft_side)
            check_header(image, limits, name, extra)
            image.load()  # a GIF, an MPO or an animation decodes its first frame
            return to_rgb(image)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{name}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"{name}: decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError, MemoryError) as error:
        raise BadImageError(f"{name}: cannot decode image ({_quiet(error)})") from None


def image_format(data: bytes, limits: DecodeLimits) -> str:
    """The format name ("PNG", ...) of an image's bytes after the same header checks."""
    try:
        with _open(data, limits, "the image") as (image, extra):
            check_header(image, limits, "the image", extra)
            return str(image.format)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"the image: decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"the image: cannot decode image ({_quiet(error)})") from None


EXIF_IFD, DATE_TIME_ORIGINAL, ORIENTATION = 0x8769, 36867, 0x0112
_EXIF_TIME = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


def header_facts(path: str | Path) -> dict[str, Any]:
    """`width` and `height` as shown (EXIF rotation applied) and `taken` (EXIF
    DateTimeOriginal, ISO-8601, no zone) read from the file's header without decoding its
    pixels; {} for a file Pillow cannot open (the decode that follows reports it)."""
    try:
        with _open(path, DecodeLimits(), str(path)) as (image, _):
            width, height = image.size
            exif = _header_exif(image)
            taken = exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL)
            rotated = exif.get(ORIENTATION) in (5, 6, 7, 8)
    except (BadImageError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            OSError, SyntaxError, ValueError):
        return {}
    facts: dict[str, Any] = {"width": height if rotated else width,
                             "height": width if rotated else height}
    match = _EXIF_TIME.fullmatch(str(taken).strip().rstrip("\x00")) if taken else None
    if match:
        year, month, day, hour, minute, second = match.groups()
        moment = f"{year}-{month}-{day}T{hour}:{minute}:{second}"
        if parse_datetime(moment) is not None:  # cameras write 0000:00:00 when unset
            facts["taken"] = moment
    return facts


def _header_exif(image: Image.Image) -> Image.Exif:
    """The EXIF that precedes the pixels. Pillow's PNG `getexif` decodes the whole image to
    look for an eXIf chunk after the pixel data (a second full decode of every PNG during a
    folder scan); one before them is already in `info`, and that is the one read here."""
    if image.format == "PNG" and "exif" not in image.info:
        return Image.Exif()
    return image.getexif()


def _draft(image: Image.Image, side: int | None) -> None:
    """Ask a JPEG decoder for its smallest scale whose shortest side is still >= `side`; the
    size checks then count what is really decoded."""
    if side is None or image.format not in ("JPEG", "MPO"):
        return
    width, height = image.size
    shortest = min(width, height)
    if shortest > 2 * side:
        image.draft("RGB", (-(-width * side // shortest), -(-height * side // shortest)))


def draft_side_of(preprocess: Any) -> int | None:
    """The largest side a model's preprocessing resizes or crops to (open_clip's Resize and
    CenterCrop), or None when it is not a transform we can read."""
    sides = []
    for step in getattr(preprocess, "transforms", []):
        size = getattr(step, "size", None)
        if type(step).__name__ in ("Resize", "CenterCrop", "ResizeKeepRatio") and size:
            sides += [size] if isinstance(size, int) else list(size)
    return max(sides) if sides else None


@contextmanager
def _open(source: str | Path | bytes, limits: DecodeLimits,
          name: str) -> Iterator[tuple[Image.Image, int]]:
    """(image, bytes its decoder allocates beside the raster): Image.open with the bomb
    warning raised as an error, for a path or bytes, after the bytes' structure is checked
    (`retrieval.inputs.imagecost`): too many scans or frames, or a WebP canvas over the byte cap,
    is refused before any decoder sees the file."""
    if isinstance(source, bytes) and not source:
        raise BadImageError("the image is empty; send a JPEG, PNG, WebP or GIF file")
    structure = _structure(source, limits, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as image:
            yield image, _check_work(image, structure, limits, name)


def _structure(source: str | Path | bytes, limits: DecodeLimits, name: str) -> Structure:
    """The bytes' structure, refused when it alone is over the limits. A file is mapped,
    not read: counting a JPEG's scans touches its pages once, as the decode would."""
    if isinstance(source, bytes):
        structure = inspect(source, limits.max_scans)
    else:
        with open(source, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise BadImageError(f"{name}: the file is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                structure = inspect(data, limits.max_scans)
    if structure.jpeg_scans > limits.max_scans:
        raise ImageTooLargeError(f"{name}: a JPEG of over {limits.max_scans} scans costs a "
                                 "full decode per scan; save it as baseline or standard "
                                 "progressive")
    if structure.frames > limits.max_frames:
        raise ImageTooLargeError(f"{name}: {structure.frames:,} frames are over the cap of "
                                 f"{limits.max_frames:,}; send a still image")
    if structure.webp_size is not None:
        width, height = structure.webp_size
        cost = webp_canvas_bytes(width, height) + decode_cost("RGBA", width, height)
        if width * height > limits.max_pixels or cost > limits.max_bytes:
            raise ImageTooLargeError(
                f"{name}: a {width}x{height} WebP needs about {cost / 2**20:,.0f} MiB to "
                f"decode, over the {limits.max_bytes / 2**20:,.0f} MiB cap; downscale it")
    return structure


def _check_work(image: Image.Image, structure: Structure, limits: DecodeLimits,
                name: str) -> int:
    """Refuse a multi-scan JPEG whose scans x pixels pass the work cap; return the bytes the
    decoder allocates beside the raster (a multi-scan JPEG's full-size coefficients, WebP's
    canvases), counted against the byte cap with the raster by `check_header`."""
    width, height = image.size  # before any draft: scans and coefficients are full-size
    if structure.jpeg_scans > 1:
        work = structure.jpeg_scans * width * height
        if work > limits.max_scan_pixels:
            raise ImageTooLargeError(
                f"{name}: {structure.jpeg_scans} scans over {width}x{height} pixels are over "
                f"the decode work cap of {limits.max_scan_pixels:,} scan-pixels; save it as a "
                "baseline JPEG or downscale it")
        sampling = [(h, v) for _, h, v, _ in getattr(image, "layer", [])]
        return coefficient_bytes(width, height, sampling)
    if structure.webp_size is not None:
        return webp_canvas_bytes(width, height)
    return 0


def check_header(image: Image.Image, limits: DecodeLimits, name: str, extra: int = 0) -> None:
    if limits.formats is not None and image.format not in limits.formats:
        raise UnsupportedImageError(
            f"{name}: {image.format or 'this'} images are not accepted; send "
            f"{', '.join(limits.formats[:-1])} or {limits.formats[-1]}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(f"{name}: {width}x{height} is over the pixel cap of "
                                 f"{limits.max_pixels:,}; downscale it")
    cost = decode_cost(image.mode, width, height) + extra
    if cost > limits.max_bytes:
        raise ImageTooLargeError(
            f"{name}: decoding this {width}x{height} {image.mode} image needs about "
            f"{cost / 2**20:,.0f} MiB, over the {limits.max_bytes / 2**20:,.0f} MiB cap; "
            "downscale it or save it as 8-bit")


def _quiet(error: BaseException) -> str:
    """Pillow's message without the repr of an in-memory buffer ("<_io.BytesIO object at
    0x7f...>"), which says nothing to a client and leaks a heap address."""
    return _OBJECT_REPR.sub("the data", str(error))


TRIM_AFTER_PIXELS = 4_000_000  # decodes bigger than this hand their freed memory back


def model_pixels(image: bytes | Image.Image, preprocess: Callable, limits: DecodeLimits) -> Any:
    """An upload (bytes) or an image, decoded within `limits` and preprocessed for the model.

    glibc keeps large freed blocks in its heap once its mmap threshold has grown past them:
    eight 40 MP uploads left 500 MB resident for good. A trim after each big decode returns
    it; small decodes (most) skip the cost."""
    decoded = load_image(image, limits=limits)
    large = decoded.width * decoded.height > TRIM_AFTER_PIXELS
    pixels = preprocess(decoded)
    del decoded
    if large:
        release_freed_memory()
    return pixels


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
