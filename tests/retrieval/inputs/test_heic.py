"""HEIC/HEIF (pi-heif) and AVIF (Pillow's own) through the one decoder, on files these
tests write: pixels, header facts, and every bound the other formats have (pixels, bytes,
frames), refused from the container's boxes before a decoder runs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import BadImageError, ImageTooLargeError
from retrieval.inputs.imagecost import inspect
from retrieval.inputs.images import (
    DATE_TIME_ORIGINAL,
    EXIF_IFD,
    ORIENTATION,
    DecodeLimits,
    decode_cost,
    header_facts,
    image_format,
    load_image,
)
from retrieval.inputs.isobmff import av1_coded_size
from tests.support.formats import encoded

FORMATS = ["HEIF", "AVIF"]


@pytest.fixture
def no_decoder(monkeypatch):
    """Any attempt to open the bytes with Pillow fails the test: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a decoder was opened")
    monkeypatch.setattr("retrieval.inputs.images.Image.open", refuse)


def photo(width: int, height: int) -> Image.Image:
    """Smooth ramps in three channels with four coloured blocks: a codec keeps it within a few
    levels, and a channel swap or a flip would be far off."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height,
                       np.full_like(x, 90)], -1).astype(np.uint8)
    half_h, half_w = height // 2, width // 2
    pixels[:half_h, :half_w] = (220, 40, 40)
    pixels[half_h:, half_w:] = (40, 60, 210)
    return Image.fromarray(pixels)


def cells(image: Image.Image) -> np.ndarray:
    """Mean colour of each 8x8 cell: (H/8, W/8, 3)."""
    pixels = np.asarray(image, np.float32)
    height, width = pixels.shape[0] // 8, pixels.shape[1] // 8
    return pixels[:height * 8, :width * 8].reshape(height, 8, width, 8, 3).mean(axis=(1, 3))


def with_ispe(data: bytes, size: tuple[int, int], only: tuple[int, int] | None = None) -> bytes:
    """`data` with every item's declared size (`ispe`), or those declaring `only`, replaced by
    `size`: what a crafted file says, while its coded streams stay as encoded."""
    out, position, changed = bytearray(data), data.find(b"ispe"), 0
    while position > 0:
        field = slice(position + 8, position + 16)
        if only is None or data[field] == only[0].to_bytes(4, "big") + only[1].to_bytes(4, "big"):
            out[field] = size[0].to_bytes(4, "big") + size[1].to_bytes(4, "big")
            changed += 1
        position = data.find(b"ispe", position + 4)
    assert changed
    return bytes(out)


# --- decoding ---
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_phone_format_decodes_to_its_pixels_from_bytes_and_from_a_file(fmt, tmp_path):
    source = photo(96, 64)
    data = encoded(source, fmt, quality=90)
    assert image_format(data, DecodeLimits()) == fmt
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(data)
    for decoded in (load_image(data), load_image(path)):
        assert decoded.mode == "RGB" and decoded.size == (96, 64)
        error = np.abs(np.asarray(decoded, np.int16) - np.asarray(source, np.int16))
        # 4:2:0 chroma blurs the blocks' sharp edges; the means of 8x8 cells keep within a few
        assert error.mean() < 3, error.mean()
        assert np.abs(cells(decoded) - cells(source)).max() < 20


@pytest.mark.parametrize("fmt", FORMATS)
def test_header_facts_give_the_shown_size_and_the_time_taken(fmt, tmp_path):
    """Rotated by EXIF orientation 6 (libheif turns a HEIC as it decodes, Pillow an AVIF's
    `irot`): the facts and the decoded image are both upright, 32 wide and 64 high."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif.get_ifd(EXIF_IFD)[DATE_TIME_ORIGINAL] = "2023:07:14 09:30:05"
    path = tmp_path / f"turned.{fmt.lower()}"
    path.write_bytes(encoded(photo(64, 32), fmt, quality=90, exif=exif.tobytes()))
    assert header_facts(path) == {"width": 32, "height": 64, "taken": "2023-07-14T09:30:05"}
    upright = load_image(path)
    assert upright.size == (32, 64)
    # turned a quarter clockwise, the red top-left block is now top-right, the blue one
    # bottom-left
    top_right, bottom_left = upright.getpixel((24, 8)), upright.getpixel((8, 56))
    assert top_right[0] > 180 and top_right[2] < 80, top_right
    assert bottom_left[2] > 170 and bottom_left[0] < 80, bottom_left


def test_an_avif_sequence_decodes_its_first_frame():
    frames = [Image.new("RGB", (64, 48), (40 * n, 200 - 40 * n, 90)) for n in range(4)]
    data = encoded(frames[0], "AVIF", save_all=True, append_images=frames[1:], quality=90)
    assert inspect(data, 100).frames == 4
    first = load_image(data)
    assert np.abs(np.asarray(first, np.int16) - (0, 200, 90)).mean() < 4


# --- bounds ---
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_huge_declared_size_is_refused_before_any_decoder_opens(fmt, no_decoder, tmp_path):
    """A 2 KB file claiming 30000x20000 pixels (600 MP): the same typed error as a JPEG or a
    PNG over the cap, from the boxes alone, in well under the time any decode takes."""
    bomb = with_ispe(encoded(photo(64, 48), fmt), (30000, 20000))
    assert len(bomb) < 20_000
    path = tmp_path / f"bomb.{fmt.lower()}"
    path.write_bytes(bomb)
    for source in (bomb, path):
        started = time.perf_counter()
        with pytest.raises(ImageTooLargeError, match="30000x20000 picture, over the pixel cap"):
            load_image(source)
        assert time.perf_counter() - started < 0.05
    with pytest.raises(ImageTooLargeError):
        image_format(bomb, DecodeLimits())
    assert header_facts(path) == {}


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_pixel_cap_is_the_same_as_for_other_formats(fmt):
    limits = DecodeLimits(max_pixels=200 * 100 - 1)
    for data in (encoded(photo(200, 100), fmt), encoded(photo(200, 100), "PNG")):
        with pytest.raises(ImageTooLargeError, match="pixel cap"):
            load_image(data, limits=limits)
    assert load_image(encoded(photo(200, 100), fmt), limits=DecodeLimits(20_000)).size == (200, 100)


def test_an_av1_stream_coded_larger_than_its_item_declares_is_refused(no_decoder):
    """libavif lets dav1d decode the size the AV1 sequence header names whatever `ispe` says
    (a 1 KB AVIF declaring 1000x1000 decoded 64 MP); that size is read before it runs."""
    data = encoded(Image.new("RGB", (1200, 1200), (90, 120, 200)), "AVIF")
    lying = with_ispe(data, (100, 100))
    assert inspect(lying, 100).coded_size == (1200, 1200)
    with pytest.raises(ImageTooLargeError, match="1200x1200 picture"):
        load_image(lying, limits=DecodeLimits(max_pixels=1_000_000))


def test_a_heic_grid_costs_every_tile_it_holds_not_the_size_it_shows():
    """Four 512x512 tiles for an image that says it is 100x100: libheif decodes every tile
    whole, tiles wholly outside the image too, so the cap counts them all (one tile alone
    and the shown image are each under it)."""
    tiled = encoded(Image.new("RGB", (1024, 1024), (90, 120, 200)), "HEIF", tile_size=512)
    data = bytearray(with_ispe(tiled, (100, 100), only=(1024, 1024)))
    grid = data.index(b"idat") + 4  # version, flags, rows - 1, columns - 1, width, height
    assert (data[grid + 2], data[grid + 3]) == (1, 1) and not data[grid + 1] & 1
    data[grid + 4:grid + 8] = (100).to_bytes(2, "big") * 2
    with pytest.raises(ImageTooLargeError, match="a grid's tiles each decoded whole"):
        load_image(bytes(data), max_pixels=600_000)
    load_image(bytes(data), max_pixels=1_100_000)  # all four tiles fit this cap


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_byte_cap_counts_what_the_codec_allocates(fmt):
    """A 512x512 RGB image costs decode_cost bytes as a PNG; as HEIC or AVIF its codec's
    planes and output copy come on top, so a cap just above the PNG's refuses them."""
    image = photo(512, 512)
    limits = DecodeLimits(max_bytes=decode_cost("RGB", 512, 512) + 1000)
    assert load_image(encoded(image, "PNG"), limits=limits).size == (512, 512)
    with pytest.raises(ImageTooLargeError, match="MiB"):
        load_image(encoded(image, fmt), limits=limits)


def test_frames_of_an_avif_sequence_are_capped_before_decoding(no_decoder):
    frames = [Image.new("RGB", (32, 32), (n, 0, 0)) for n in range(5)]
    data = encoded(frames[0], "AVIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageTooLargeError, match="5 frames"):
        load_image(data, limits=DecodeLimits(max_frames=3))


def test_a_container_of_endless_boxes_is_refused_fast(no_decoder):
    head = b"\x00\x00\x00\x14ftypheic\x00\x00\x00\x00mif1"
    junk = head + b"\x00\x00\x00\x08free" * 200_000  # 1.6 MB of empty boxes
    started = time.perf_counter()
    with pytest.raises(BadImageError, match="cannot be read"):
        load_image(junk)
    assert time.perf_counter() - started < 0.5


# --- the AV1 sequence header, against a writer that follows the spec (AV1 5.5) ---
class BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def put(self, value: int, count: int) -> BitWriter:
        self.bits += [(value >> shift) & 1 for shift in range(count - 1, -1, -1)]
        return self

    def payload(self) -> bytes:
        padded = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(int("".join(map(str, padded[i:i + 8])), 2) for i in range(0, len(padded), 8))


def sequence_header(width: int, height: int) -> bytes:
    """A full (not reduced) header with timing info, a decoder model and two operating
    points, each with a decoder model and an initial display delay."""
    bits = BitWriter().put(0, 3).put(1, 1).put(0, 1)  # profile, still picture, not reduced
    bits.put(1, 1).put(1, 32).put(25, 32)  # timing info: display tick, time scale
    bits.put(1, 1).put(0b00101, 5)  # equal picture interval: uvlc of 4
    bits.put(1, 1).put(9, 5).put(1, 32).put(4, 5).put(4, 5)  # decoder model: 10-bit delays
    bits.put(1, 1).put(1, 5)  # initial display delay present; two operating points
    for level in (8, 3):  # the first has a tier bit (level > 7)
        bits.put(0, 12).put(level, 5)
        if level > 7:
            bits.put(0, 1)
        bits.put(1, 1).put(3, 10).put(5, 10).put(0, 1)  # decoder model for this point
        bits.put(1, 1).put(2, 4)  # initial display delay
    bits.put(15, 4).put(15, 4).put(width - 1, 16).put(height - 1, 16)
    return bits.payload() + b"\xff" * 4  # the colour config and the rest follow


def test_the_av1_sequence_header_gives_the_largest_frame():
    payload = sequence_header(40000, 30000)
    temporal_delimiter = b"\x12\x00"
    stream = temporal_delimiter + bytes([0x0A, len(payload)]) + payload + b"\x32\x10"
    assert av1_coded_size(stream) == (40000, 30000)
    assert av1_coded_size(stream[:len(stream) // 2]) == (0, 0)  # cut short: cannot tell
    assert av1_coded_size(b"\x32\x10" + stream) == (0, 0)  # a frame before any header


def test_real_files_are_sized_from_their_boxes(tmp_path):
    for fmt in FORMATS:
        data = encoded(photo(96, 64), fmt)
        assert inspect(data, 100).coded_size == (96, 64)
    path: Path = tmp_path / "still.heic"
    path.write_bytes(encoded(photo(96, 64), "HEIF"))
    assert header_facts(path) == {"width": 96, "height": 64}


def test_an_item_property_table_that_claims_billions_of_entries_is_read_in_no_time():
    """ipma's entry count is 32 bits: the parse ends where the box ends, not at the count."""
    data = bytearray(encoded(photo(64, 48), "HEIF"))
    ipma = data.index(b"ipma") + 4
    data[ipma + 4:ipma + 8] = (0xFFFFFFFF).to_bytes(4, "big")
    started = time.perf_counter()
    inspect(bytes(data), 100)
    assert time.perf_counter() - started < 0.5
