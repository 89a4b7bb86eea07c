"""The one decoder of untrusted images (files for the indexer, uploads for the service): it
turns whatever Pillow can open (HEIC/HEIF through pi-heif, AVIF through Pillow's own
plugin, as well as its usual formats) into a safe, upright 8-bit RGB image at a bounded cost."""

from __future__ import annotations

import io
import mmap
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pi_heif import register_heif_opener
from PIL import Image, ImageOps

from retrieval.errors import BadImageError, ImageTooLargeError, UnsupportedImageError
from retrieval.fields.values import parse_datetime
from retrieval.heap import release_freed_memory
from retrieval.inputs.imagecost import Structure, coefficient_bytes, inspect, webp_canvas_bytes

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
# Bytes per pixel a HEIF or AVIF decode allocates beyond what the same image costs as a PNG:
# the peak resident memory of `load_image` over 12 MP photographs here, less that of the same
# pixels as a PNG of the same mode. libheif's YCbCr planes and output 0.3-0.5 (4:2:0 and
# 4:4:4, 8 and 10 bits, grid or single, alpha); libavif's planes and the RGB bytes Pillow
# copies out 2.3-4.0 at 8 bits, and a 10- or 12-bit 4:4:4 stream's planes hold 3 more.
# Counted over every pixel coded (a grid's tiles too): a 48 MP iPhone HEIC, 50 MP of tiles,
# stays under the default byte cap; a 48 MP AVIF needs a larger one.
_CONTAINER_BYTES = {"HEIF": 1, "AVIF": 7}

# Phones write HEIC. Only the primary image is ever decoded, so the thumbnails, depth maps
# and auxiliary images a HEIC holds are not even listed when it is opened.
register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


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
        raise BadImageError("the image is empty; send a JPEG, PNG, WebP, GIF, HEIC or AVIF "
                            "file")
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
    if structure.coded_size is not None:
        _check_pictures(structure, limits, name)
    return structure


def _check_pictures(structure: Structure, limits: DecodeLimits, name: str) -> None:
    """Refuse a HEIF or AVIF container any of whose pictures (the image, a grid's tile, an
    alpha plane, what an AV1 stream codes) is over the pixel cap, or cannot be sized, or
    whose pictures together are: libheif decodes every tile of a grid whole, those outside
    the image too, so a 100x100 image can cost many megapixels."""
    width, height = structure.coded_size or (0, 0)
    if width * height == 0:
        raise BadImageError(f"{name}: the size of a picture in this HEIF or AVIF file cannot "
                            "be read; save it again")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(f"{name}: it holds a {width}x{height} picture, over the "
                                 f"pixel cap of {limits.max_pixels:,}; downscale it")
    if structure.coded_pixels > limits.max_pixels:
        raise ImageTooLargeError(f"{name}: its pictures (a grid's tiles each decoded whole) "
                                 f"hold {structure.coded_pixels:,} pixels, over the pixel cap "
                                 f"of {limits.max_pixels:,}; save it again or downscale it")


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
    if structure.coded_size is not None:
        return _container_bytes(image, structure.coded_pixels)
    return 0


def _container_bytes(image: Image.Image, coded_pixels: int) -> int:
    """What a HEIF or AVIF decode allocates beside the raster, over every pixel it decodes:
    the image's, or all its coded pictures' (a grid's tiles are decoded whole)."""
    width, height = image.size
    pixels = max(width * height, coded_pixels)
    return _CONTAINER_BYTES.get(str(image.format), max(_CONTAINER_BYTES.values())) * pixels


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
