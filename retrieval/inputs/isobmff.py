"""HEIF (HEIC) and AVIF structure: the ISOBMFF boxes that say which pictures a decoder will
decode, read from the bytes before any decoder runs (`retrieval.inputs.imagecost` turns them
into a decode cost). Each item declares its size (`ispe`, through `ipma`), and an AV1 stream
codes its own, which libavif trusts over the declaration; both are read, within bounds on
boxes and bytes, so a lying or endless file costs milliseconds.
"""

from __future__ import annotations

import mmap

Buffer = bytes | mmap.mmap  # an upload's bytes, or a file mapped without reading it all


_FULL_BOX = {b"meta": 4}  # containers whose children follow a version and flags
_AV1_READ = 65536  # bytes of an AV1 item read to find its sequence header (it comes first)
# Boxes one container may hold before the file is refused as unreadable: an iPhone's 48 MP
# HEIC has about 200 items; a million 8-byte boxes would cost seconds of parsing here.
_MAX_BOXES = 10_000


class Unreadable(Exception):
    """The container's boxes cannot be read within the parsing bounds."""


def container_pictures(data: Buffer) -> tuple[list[tuple[int, int]], list[tuple[int, int]],
                                              int]:
    """(the picture sizes an ISOBMFF image declares, those its AV1 streams code, frames of
    its longest track): the items' `ispe` properties, and the sequence header of each AV1
    item and of the first sample of each AV1 track; (0, 0) for an AV1 stream whose sequence
    header is not found."""
    declared = [size for meta, end in _path(data, (b"meta",))
                for size in _item_sizes(data, meta, end)]
    pictures: list[tuple[int, int]] = []
    for meta, end in _path(data, (b"meta",)):
        locations = _item_locations(data, meta, end)
        idat = next(iter(_path(data, (b"idat",), meta, end)), (0, 0))[0]
        for item in _av1_items(data, meta, end):
            extents = [(idat + offset if method == 1 else offset, length)
                       for method, offset, length in locations.get(item, [])]
            pictures.append(av1_coded_size(_gather(data, extents)))
    frames = 1
    for stbl, end in _path(data, (b"moov", b"trak", b"mdia", b"minf", b"stbl")):
        first, count = _first_sample(data, stbl, end)
        frames = max(frames, count)
        if first is not None and _has_av01(data, stbl, end):
            pictures.append(av1_coded_size(_gather(data, [first])))
    return declared, pictures, frames


def _item_sizes(data: Buffer, meta: int, end: int) -> list[tuple[int, int]]:
    """The size each item declares (its `ispe`, through `ipma`): items that share one
    property box (a grid's tiles) are each counted."""
    sizes: dict[int, tuple[int, int]] = {}
    for ipco, stop in _path(data, (b"iprp", b"ipco"), meta, end):
        for index, (kind, body, _) in enumerate(_boxes(data, ipco, stop), start=1):
            if kind == b"ispe":
                sizes[index] = (_u32(data, body + 4), _u32(data, body + 8))
    found = []
    for body, stop in _path(data, (b"iprp", b"ipma"), meta, end):
        version, flags = data[body], data[body + 3]
        reader = _Fields(data, body + 4, stop)
        for _ in range(reader.take(4)):
            if reader.position >= stop:  # a count the box cannot hold ends with the box
                break
            reader.take(2 if version < 1 else 4)  # the item's id
            indexes = [reader.take(2 if flags & 1 else 1) & (0x7FFF if flags & 1 else 0x7F)
                       for _ in range(reader.take(1))]
            found += [sizes[i] for i in indexes if i in sizes][:1]
    return found or list(sizes.values())


def _boxes(data: Buffer, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, body start, end) of the boxes laid end to end in data[start:end]."""
    found, position = [], start
    while position + 8 <= end:
        size, kind, body = _u32(data, position), bytes(data[position + 4:position + 8]), position + 8
        if size == 1 and position + 16 <= end:
            size, body = int.from_bytes(data[position + 8:position + 16], "big"), position + 16
        elif size == 0:
            size = end - position
        if size < body - position:
            break
        found.append((kind, body, min(position + size, end)))
        if len(found) > _MAX_BOXES:
            raise Unreadable
        position += size
    return found


def _path(data: Buffer, path: tuple[bytes, ...], start: int = 0,
          end: int | None = None) -> list[tuple[int, int]]:
    """(body start, end) of every box reached by following `path` from data[start:end]."""
    ranges = [(start, len(data) if end is None else end)]
    for kind in path:
        ranges = [(body + _FULL_BOX.get(kind, 0), stop) for first, last in ranges
                  for name, body, stop in _boxes(data, first, last) if name == kind]
    return ranges


def _av1_items(data: Buffer, meta: int, end: int) -> list[int]:
    """IDs of the AV1 coded items (`av01` in `iinf`): colour, alpha and grid tiles alike."""
    items = []
    for body, stop in _path(data, (b"iinf",), meta, end):
        entries = body + (6 if data[body] == 0 else 8)
        for kind, infe, _ in _boxes(data, entries, stop):
            version = data[infe] if kind == b"infe" else 0
            if version >= 2:
                id_size = 2 if version == 2 else 4
                item = int.from_bytes(data[infe + 4:infe + 4 + id_size], "big")
                if data[infe + 6 + id_size:infe + 10 + id_size] == b"av01":
                    items.append(item)
    return items


def _item_locations(data: Buffer, meta: int, end: int) -> dict[int, list[tuple[int, int, int]]]:
    """item ID -> its extents as (construction method, offset, length), from `iloc`:
    method 0 is an offset in the file, 1 in the `idat` box (2, other items, is not read)."""
    locations: dict[int, list[tuple[int, int, int]]] = {}
    for body, stop in _path(data, (b"iloc",), meta, end):
        version, reader = data[body], _Fields(data, body + 4, stop)
        sizes = reader.take(1)
        offset_size, length_size = sizes >> 4, sizes & 15
        sizes = reader.take(1)
        base_size, index_size = sizes >> 4, (sizes & 15 if version in (1, 2) else 0)
        for _ in range(reader.take(2 if version < 2 else 4)):
            if reader.position >= stop:
                break
            item = reader.take(2 if version < 2 else 4)
            method = reader.take(2) & 15 if version in (1, 2) else 0
            reader.take(2)  # data reference index
            base = reader.take(base_size)
            extents = []
            for _ in range(reader.take(2)):
                if reader.position >= stop:
                    break
                reader.take(index_size)
                extents.append((method, base + reader.take(offset_size), reader.take(length_size)))
            locations[item] = extents
    return locations


def _first_sample(data: Buffer, stbl: int, end: int) -> tuple[tuple[int, int] | None, int]:
    """((offset, length) of a track's first sample or None, the track's sample count)."""
    sizes = _path(data, (b"stsz",), stbl, end)
    chunks = _path(data, (b"stco",), stbl, end) or _path(data, (b"co64",), stbl, end)
    if not sizes or not chunks:
        return None, 1
    body = sizes[0][0]
    fixed, count = _u32(data, body + 4), _u32(data, body + 8)
    length = fixed or _u32(data, body + 12)
    wide = bool(_path(data, (b"co64",), stbl, end)) and not _path(data, (b"stco",), stbl, end)
    offset_at = chunks[0][0] + 8
    offset = int.from_bytes(data[offset_at:offset_at + (8 if wide else 4)], "big")
    return ((offset, length) if count else None), max(count, 1)


def _has_av01(data: Buffer, stbl: int, end: int) -> bool:
    """Whether a track's sample description names AV1 (`av01` after stsd's entry count)."""
    return any(kind == b"av01" for body, stop in _path(data, (b"stsd",), stbl, end)
               for kind, _, _ in _boxes(data, body + 8, stop))


def _gather(data: Buffer, extents: list[tuple[int, int]]) -> bytes:
    """The first `_AV1_READ` bytes of an item laid out in `extents` (length 0: to the end)."""
    out = bytearray()
    for offset, length in extents:
        stop = len(data) if length == 0 else min(len(data), offset + length)
        out += data[offset:min(stop, offset + _AV1_READ - len(out))]
        if len(out) >= _AV1_READ:
            break
    return bytes(out)


def av1_coded_size(stream: bytes) -> tuple[int, int]:
    """The largest frame (max_frame_width, max_frame_height) an AV1 stream's sequence header
    allows, which is what dav1d may decode; (0, 0) when no sequence header is found among the
    OBUs that open the stream."""
    position = 0
    while position < len(stream):
        header = stream[position]
        kind, extended, sized = (header >> 3) & 15, header >> 2 & 1, header >> 1 & 1
        position += 1 + extended
        size, position = _leb128(stream, position) if sized else (len(stream) - position, position)
        if kind == 1:  # OBU_SEQUENCE_HEADER; cut short by the read: unknown
            payload = stream[position:position + size]
            return _sequence_size(payload) if len(payload) == size else (0, 0)
        if kind not in (2, 5, 15):  # before it only temporal delimiters, metadata, padding
            break
        position += size
    return (0, 0)


def _sequence_size(payload: bytes) -> tuple[int, int]:
    """max_frame_width/height from an AV1 sequence header (AV1 spec 5.5.1)."""
    bits = _Bits(payload)
    bits.take(3)  # seq_profile
    bits.take(1)  # still_picture
    if bits.take(1):  # reduced_still_picture_header: one operating point, no timing
        bits.take(5)
    else:
        model = _timing_info(bits)
        initial_delay = bits.take(1)
        for _ in range(bits.take(5) + 1):  # operating points
            bits.take(12)  # operating_point_idc
            if bits.take(5) > 7:  # seq_level_idx
                bits.take(1)  # seq_tier
            if model and bits.take(1):  # decoder_model_present_for_this_op
                bits.take(2 * model + 1)  # decoder and encoder buffer delays, low delay flag
            if initial_delay and bits.take(1):
                bits.take(4)
    width_bits, height_bits = bits.take(4) + 1, bits.take(4) + 1
    size = bits.take(width_bits) + 1, bits.take(height_bits) + 1
    return size if bits.left >= 0 else (0, 0)  # a header shorter than its fields: unknown


def _timing_info(bits: _Bits) -> int:
    """Read timing_info and decoder_model_info; the decoder model's buffer delay length in bits
    (0: no decoder model)."""
    if not bits.take(1):  # timing_info_present_flag
        return 0
    bits.take(64)  # num_units_in_display_tick, time_scale
    if bits.take(1):  # equal_picture_interval: num_ticks_per_picture_minus_1 as uvlc
        zeros = 0
        while not bits.take(1) and bits.left >= 0:
            zeros += 1
        bits.take(zeros if zeros < 32 else 0)
    if not bits.take(1):  # decoder_model_info_present_flag
        return 0
    delay_bits = bits.take(5) + 1
    bits.take(32 + 5 + 5)  # decoding tick, removal time and presentation time lengths
    return delay_bits


class _Bits:
    """Big-endian bits of a payload; past its end they read as zeros and `left` goes below 0."""

    def __init__(self, payload: bytes) -> None:
        self.value, self.left = int.from_bytes(payload, "big"), 8 * len(payload)

    def take(self, count: int) -> int:
        self.left -= count
        if self.left >= 0:
            return (self.value >> self.left) & ((1 << count) - 1)
        return 0


class _Fields:
    """Big-endian fields of the given byte widths, read one after another up to `end`."""

    def __init__(self, data: Buffer, position: int, end: int) -> None:
        self.data, self.position, self.end = data, position, end

    def take(self, size: int) -> int:
        start, self.position = self.position, min(self.position + size, self.end)
        return int.from_bytes(self.data[start:self.position], "big")


def _leb128(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    for index in range(8):
        if position >= len(data):
            break
        byte, position = data[position], position + 1
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            break
    return value, position


def _u32(data: Buffer, position: int) -> int:
    return int.from_bytes(data[position:position + 4], "big")
