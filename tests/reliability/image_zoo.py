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


def progressive_jpeg(side: int, repeats: int = 0, subsampling: int = 2) -> bytes:
    """A flat progressive JPEG whose last AC scan is repeated `repeats` more times: each
    copy is ~50 bytes and costs a decode pass over the whole image (a scan bomb)."""
    data = _save(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", progressive=True,
                 quality=90, subsampling=subsampling)
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * repeats + b"\xff\xd9"


def animated(fmt: str, side: int = 16, frames: int = 2) -> bytes:
    """A small animation (WEBP, PNG or GIF) whose frames differ in colour."""
    images = [Image.new("RGB", (side, side), (40 * i, 90, 200)) for i in range(frames)]
    return _save(images[0], fmt, save_all=True, append_images=images[1:], duration=100,
                 lossless=True)


def webp_canvas_bomb(side: int = 6000) -> bytes:
    """A few hundred bytes of animated WebP whose header names a side x side canvas, which
    libwebp allocates twice when the file is opened."""
    data = bytearray(animated("WEBP"))
    at = data.index(b"VP8X") + 8  # canvas width-1 and height-1, 24 bits each
    data[at + 4:at + 10] = (side - 1).to_bytes(3, "little") * 2
    return bytes(data)


def apng_frames_bomb(frames: int = 10**6) -> bytes:
    """An animated PNG whose acTL claims `frames` frames."""
    data = bytearray(animated("PNG"))
    at = data.index(b"acTL") + 4
    data[at:at + 4] = frames.to_bytes(4, "big")
    return bytes(data)


def mpo(primary: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A two-picture MPO (phones' and cameras' multi-picture JPEG) of a flat primary image."""
    return _save(Image.new("RGB", (64, 48), primary), "MPO", save_all=True,
                 append_images=[Image.new("RGB", (64, 48))])


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
        "mpo": ("camera.jpg", mpo()),
        "animated webp": ("animated.webp", animated("WEBP")),
        "progressive jpeg": ("progressive.jpg", progressive_jpeg(64)),
    }


def bad_images() -> dict[str, tuple[str, bytes]]:
    """Broken or hostile: each must be refused (never crash)."""
    valid = _save(_photo(), "PNG")
    return {
        "truncated png": ("truncated.png", valid[: len(valid) // 2]),
        "zero-byte file": ("empty.png", b""),
        "html renamed .jpg": ("page.jpg", b"<!doctype html><html><body>hi</body></html>"),
        "decompression bomb header": ("bomb.png", _bomb_png()),
        "jpeg scan bomb": ("scans.jpg", progressive_jpeg(400, repeats=3000)),
        "webp canvas bomb": ("canvas.webp", webp_canvas_bomb()),
        "apng frames bomb": ("frames.png", apng_frames_bomb()),
    }
