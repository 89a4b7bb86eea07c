"""Awkward image files, generated in memory: valid oddities a service must accept and broken
ones it must refuse cleanly. name -> (file name, bytes)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _photo(size: tuple[int, int] = (32, 24)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    return _save(_photo(), "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("P", (16, 16), colour) for colour in (1, 2, 3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _palette_alpha_png() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (0, 0, 8, 8))
    return _save(image, "PNG", transparency=0)


def _bomb_png(width: int = 200_000, height: int = 200_000) -> bytes:
    """A valid PNG whose IHDR claims width x height (the pixel data is a single tiny row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def good_images() -> dict[str, tuple[str, bytes]]:
    """Odd but valid: each must be accepted."""
    return {
        "cmyk jpeg": ("cmyk.jpg", _save(_photo().convert("CMYK"), "JPEG")),
        "16-bit png": ("grey16.png", _save(Image.fromarray(
            np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 80), "PNG")),
        "palette png with alpha": ("palette.png", _palette_alpha_png()),
        "exif-rotated jpeg": ("rotated.jpg", _exif_rotated_jpeg()),
        "animated gif": ("animated.gif", _animated_gif()),
        "1x1 png": ("dot.png", _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")),
        "20000x1 png": ("strip.png", _save(Image.new("L", (20000, 1), 128), "PNG")),
        "rgba png": ("rgba.png", _save(_photo().convert("RGBA"), "PNG")),
    }


def bad_images() -> dict[str, tuple[str, bytes]]:
    """Broken or hostile: each must be refused (never crash)."""
    valid = _save(_photo(), "PNG")
    return {
        "truncated png": ("truncated.png", valid[: len(valid) // 2]),
        "zero-byte file": ("empty.png", b""),
        "html renamed .jpg": ("page.jpg", b"<!doctype html><html><body>hi</body></html>"),
        "decompression bomb header": ("bomb.png", _bomb_png()),
    }
