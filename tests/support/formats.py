"""Image bytes in any format the tests need, HEIC included. clipdex decodes HEIC with pi-heif
(decode only, LGPL wheels); writing one takes pillow-heif's encoder, a test-time tool
(the `dev` extra) that clipdex itself never imports."""

from __future__ import annotations

import io

from PIL import Image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    """`image` saved as `fmt` ("HEIF", "AVIF", "PNG", ...) with the writer's `options`."""
    buffer = io.BytesIO()
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.from_pillow(image).save(buffer, **options)
    else:
        image.save(buffer, format=fmt, **options)
    return buffer.getvalue()
