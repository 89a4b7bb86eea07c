"""Uploaded image bytes -> an upright RGB image, with the format and pixel checks first."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

from PIL import Image

from api.errors import Problem
from retrieval.errors import BadImageError
from retrieval.images import to_rgb

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")  # GIF: the first frame
UPLOAD_MEDIA_TYPES = "image/jpeg, image/png, image/webp, image/gif"


def upload_openapi(*fields: str) -> dict[str, Any]:
    """A multipart route's `openapi_extra`: the media types its file parts accept, so the schema
    says "an image file" rather than any bytes (the server sniffs the bytes, not this header)."""
    encoding = {name: {"contentType": UPLOAD_MEDIA_TYPES} for name in fields}
    return {"requestBody": {"content": {"multipart/form-data": {"encoding": encoding}}}}


def decode_upload(data: bytes, max_pixels: int, keep_format: bool = False) -> Any:
    """Check format and size from the header, then decode; EXIF orientation is applied.
    With `keep_format`, return the format name ("PNG", ...) instead, after the same checks."""
    if not data:
        raise BadImageError("the image upload is empty; attach a JPEG, PNG, WebP or GIF file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                _check_header(image, max_pixels)
                image.load()  # a GIF decodes its first frame
                return image.format if keep_format else to_rgb(image)
    except Problem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Problem(413, "Image too large", f"decompression bomb refused ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"cannot decode the image ({error}); send a valid JPEG, PNG, "
                            "WebP or GIF file") from None


def _check_header(image: Image.Image, max_pixels: int) -> None:
    if image.format not in ALLOWED_FORMATS:
        raise Problem(415, "Unsupported image format",
                      f"{image.format or 'this'} images are not accepted; send JPEG, PNG, "
                      "WebP or GIF")
    width, height = image.size
    if width * height > max_pixels:
        raise Problem(413, "Image too large",
                      f"{width}x{height} is over the {max_pixels:,}-pixel cap; downscale it")


def decode_base64(text: str) -> bytes:
    """A base64 image (a data: URL prefix is allowed) -> bytes."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImageError("image_base64 is not valid base64; encode the file's bytes "
                            "with standard base64") from None
