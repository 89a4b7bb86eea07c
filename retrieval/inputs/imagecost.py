"""What decoding an image will cost, read from its bytes before any decoder runs.

Pixel and byte caps on the header bound a decode's raster, but not its work, nor what the
decoders allocate beside the raster:

- a progressive (or any multi-scan) JPEG is decoded once per scan over the whole image:
  a flat 4000x4000 photograph with its last AC scan repeated 3,000 times (53 bytes a scan,
  217 KB) costs 40 s of CPU. Scans are counted from the markers, and scans x pixels is
  capped, before libjpeg sees the file;
- such a JPEG also holds every DCT coefficient of the full-size image while it decodes
  (2 bytes a coefficient per component, whatever scale it is drafted to): a 1 MB 9400x9400
  4:4:4 progressive file needs 505 MiB there;
- Pillow opens every WebP through libwebp's animation decoder, which allocates two RGBA
  canvases of the full size when the file is opened: a 138-byte two-frame 6000x6000 WebP
  costs 275 MiB before a pixel is decoded. Its size is read from the RIFF header first;
- animated WebP and PNG say how many frames they hold; only the first is ever decoded, and
  files claiming more than `max_frames` are refused as malformed input;
- HEIF (HEIC) and AVIF are ISOBMFF containers whose items each declare their size (`ispe`).
  libheif refuses an HEVC stream coded larger than its item declares, but libavif lets dav1d
  decode whatever size the AV1 sequence header names (up to 16384x16384): a 1 KB file that
  declares 1000x1000 decoded a 64 MP picture here. So the largest picture any item declares,
  or any AV1 item or track codes, is read from the boxes before a decoder runs.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from retrieval.inputs.isobmff import Buffer, Unreadable, container_pictures

_JPEG_STANDALONE = {0x01, *range(0xD0, 0xDA)}  # markers without a length field
_SOS = 0xDA


@dataclass(frozen=True)
class Structure:
    """Facts about an image's bytes that decide its decode cost (0: not that format)."""

    jpeg_scans: int = 0
    frames: int = 1
    webp_size: tuple[int, int] | None = None  # the canvas libwebp allocates at open
    # HEIF and AVIF: the largest picture any item declares or any AV1 stream codes, each of
    # which a decoder may decode whole; (0, 0) when the size of one cannot be read
    coded_size: tuple[int, int] | None = None
    coded_pixels: int = 0  # all those pictures together: a grid's tiles are each decoded whole




def inspect(data: Buffer, max_scans: int) -> Structure:
    """The structure of an encoded image; formats it does not know give the defaults. JPEG
    scans are counted up to one past `max_scans` (enough to refuse)."""
    if data[:2] == b"\xff\xd8":
        return Structure(jpeg_scans=jpeg_scans(data, max_scans + 1))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size, frames = webp_canvas(data)
        return Structure(frames=frames, webp_size=size)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return Structure(frames=png_frames(data))
    if data[4:8] == b"ftyp":
        try:
            declared, coded, frames = container_pictures(data)
        except Unreadable:
            return Structure(coded_size=(0, 0))
        pictures = declared + coded
        largest = (0, 0) if (0, 0) in pictures else max(
            pictures, key=lambda size: size[0] * size[1], default=None)
        # an AV1 item both declares and codes its size: each list counts it once
        total = max(sum(w * h for w, h in declared), sum(w * h for w, h in coded))
        return Structure(frames=frames, coded_size=largest, coded_pixels=total)
    return Structure()


def jpeg_scans(data: Buffer, stop_at: int) -> int:
    """Start-of-scan markers of a JPEG, counted up to `stop_at`: the header's segments are
    walked by their lengths to the first scan (so an EXIF thumbnail is not counted), then
    each SOS marker after it is found (entropy-coded data never holds 0xFF 0xDA: a 0xFF
    there is stuffed). One C-level search per scan."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker == _SOS:
            break
        elif marker in _JPEG_STANDALONE:
            position += 2
        else:
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    scans = 0
    while scans < stop_at:
        position = data.find(b"\xff\xda", position)
        if position < 0:
            break
        scans, position = scans + 1, position + 2
    return scans


def webp_canvas(data: Buffer) -> tuple[tuple[int, int] | None, int]:
    """((width, height) of the canvas, frames) from a WebP's chunks, without decoding:
    VP8X names the canvas, VP8 and VP8L a still image's size, ANMF chunks are frames."""
    size: tuple[int, int] | None = None
    frames, position = 0, 12
    while position + 8 <= len(data):
        kind, length = data[position:position + 4], int.from_bytes(
            data[position + 4:position + 8], "little")
        body = data[position + 8:position + 8 + min(length, 30)]
        if kind == b"VP8X" and len(body) >= 10:
            size = (1 + int.from_bytes(body[4:7], "little"),
                    1 + int.from_bytes(body[7:10], "little"))
        elif kind == b"VP8 " and size is None and len(body) >= 10:
            width, height = struct.unpack("<HH", body[6:10])
            size = (width & 0x3FFF, height & 0x3FFF)
        elif kind == b"VP8L" and size is None and len(body) >= 5:
            bits = int.from_bytes(body[1:5], "little")
            size = (1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
        elif kind == b"ANMF":
            frames += 1
        position += 8 + length + (length & 1)
    return size, max(frames, 1)


def png_frames(data: Buffer) -> int:
    """An animated PNG's frame count from its acTL chunk (1 for a still PNG); acTL must come
    before the image data, so only the chunks up to the first IDAT are read."""
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        if kind == b"acTL" and length >= 4:
            return max(1, int.from_bytes(data[position + 8:position + 12], "big"))
        if kind == b"IDAT":
            break
        position += 12 + length
    return 1


def coefficient_bytes(width: int, height: int, sampling: list[tuple[int, int]]) -> int:
    """Bytes of the full-size DCT coefficient buffer a multi-scan JPEG keeps while it decodes:
    per component, its blocks (its share of the image by its sampling factors, rounded up to
    8x8 blocks) times 64 coefficients of 2 bytes."""
    if not sampling:
        sampling = [(1, 1)] * 3
    most_h = max(h for h, _ in sampling) or 1
    most_v = max(v for _, v in sampling) or 1
    total = 0
    for h, v in sampling:
        blocks_x = math.ceil(math.ceil(width * h / most_h) / 8)
        blocks_y = math.ceil(math.ceil(height * v / most_v) / 8)
        total += blocks_x * blocks_y * 64 * 2
    return total


def webp_canvas_bytes(width: int, height: int) -> int:
    """What libwebp's animation decoder allocates when Pillow opens a WebP: two RGBA canvases
    (the current frame and the disposed previous one)."""
    return width * height * 4 * 2
