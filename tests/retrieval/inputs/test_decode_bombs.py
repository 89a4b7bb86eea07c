"""Decode-time bombs against the one decoder (uploads and the indexer's files alike): each
is refused from its bytes' structure before a decoder runs, or counted at what the decoder
really allocates; ordinary images of the same formats still decode."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from api.images import upload_limits
from retrieval.errors import ImageTooLargeError
from retrieval.inputs.imagecost import coefficient_bytes, inspect
from retrieval.inputs.images import DecodeLimits, load_image
from tests.reliability.image_zoo import (
    animated,
    apng_frames_bomb,
    mpo,
    progressive_jpeg,
    webp_canvas_bomb,
)

FLAT = (120, 130, 140)


@pytest.fixture
def no_decoder(monkeypatch):
    """Any attempt to open the bytes with Pillow fails the test: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a decoder was opened")
    monkeypatch.setattr("retrieval.inputs.images.Image.open", refuse)


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(no_decoder, tmp_path):
    bomb = progressive_jpeg(400, repeats=3000)  # ~160 KB: 3,000 passes over the image
    assert inspect(bomb, 10**6).jpeg_scans > 3000
    with pytest.raises(ImageTooLargeError, match="scans"):
        load_image(bomb)
    path = tmp_path / "bomb.jpg"  # the indexer reads files: the same check, mapped not read
    path.write_bytes(bomb)
    with pytest.raises(ImageTooLargeError, match="scans"):
        load_image(path)


def test_scans_times_pixels_are_capped_and_standard_progressive_passes():
    limits = DecodeLimits(max_scan_pixels=40_000_000)
    standard = progressive_jpeg(1000)  # the encoder's own 10 scans: 10 M scan-pixels
    assert load_image(standard, limits=limits).size == (1000, 1000)
    with pytest.raises(ImageTooLargeError, match="decode work cap"):
        load_image(progressive_jpeg(1000, repeats=40), limits=limits)  # 50 scans: 50 M


def test_a_progressive_jpeg_counts_its_full_size_coefficients():
    """Drafted to 250 px, the raster is small, but libjpeg holds every coefficient of the
    2000 x 2000 4:4:4 image: 24 MB, over a 16 MiB cap; the baseline file decodes."""
    limits = DecodeLimits(max_bytes=16 * 2**20, draft_side=250)
    assert coefficient_bytes(2000, 2000, [(1, 1)] * 3) == 2000 * 2000 * 3 * 2
    with pytest.raises(ImageTooLargeError, match="MiB"):
        load_image(progressive_jpeg(2000, subsampling=0), limits=limits)
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 2000), FLAT).save(buffer, "JPEG", subsampling=0)
    assert load_image(buffer.getvalue(), limits=limits).size == (250, 250)


def test_a_tiny_webp_naming_a_huge_canvas_is_refused_before_libwebp_allocates_it(no_decoder):
    data = webp_canvas_bomb(6000)
    assert len(data) < 1000
    with pytest.raises(ImageTooLargeError, match="6000x6000 WebP"):
        load_image(data)


def test_frames_are_capped_from_the_header(no_decoder):
    with pytest.raises(ImageTooLargeError, match="frames"):
        load_image(apng_frames_bomb(10**6))


@pytest.mark.parametrize("fmt", ["WEBP", "PNG", "GIF"])
def test_small_animations_decode_their_first_frame(fmt):
    image = load_image(animated(fmt), limits=upload_limits(40_000_000, 384 * 2**20))
    assert image.size == (16, 16) and image.getpixel((8, 8)) == (0, 90, 200)


def test_an_mpo_is_accepted_and_gives_its_primary_image(tmp_path: Path):
    data = mpo((200, 30, 30))
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
    image = load_image(data, limits=upload_limits(40_000_000, 384 * 2**20, draft_side=32))
    red, green, blue = image.getpixel((20, 20))
    assert image.size == (64, 48) and red > 180 and green < 60 and blue < 60
    path = tmp_path / "camera.mpo"
    path.write_bytes(data)
    assert load_image(path).size == (64, 48)
