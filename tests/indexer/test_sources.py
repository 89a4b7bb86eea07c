"""What the sources tell about each item, as typed filterable metadata: a folder's facts
(folder, file name, modification time, header size, EXIF time) and typed CSV cells."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone

import pytest
from PIL import Image

from indexer.sources import collect
from retrieval.digest import sha256_file
from retrieval.inputs.captions import cell_value
from tests.conftest import make_image


def test_a_folder_gives_each_image_its_folder_name_time_size_and_exif_time(tmp_path):
    root = tmp_path / "photos"
    make_image(root / "2024" / "trip" / "beach.png", (10, 120, 200), size=(64, 32))
    rotated = Image.new("RGB", (30, 20))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = "2024:06:01 12:30:00"  # DateTimeOriginal
    exif[0x0112] = 6  # shown turned a quarter: 20 wide, 30 high
    rotated.save(root / "cam.jpg", exif=exif)
    os.utime(root / "cam.jpg", (1_700_000_000, 1_700_000_000))
    found = {entry.path.name: entry.metadata for entry in collect([root]).images}
    beach, cam = root / "2024" / "trip" / "beach.png", root / "cam.jpg"
    assert found["beach.png"] == {
        "folder": "2024/trip", "file_name": "beach.png", "width": 64, "height": 32,
        "modified": found["beach.png"]["modified"], "file_size": beach.stat().st_size,
        "sha256": sha256_file(beach)}
    assert found["cam.jpg"] == {
        "folder": "", "file_name": "cam.jpg", "width": 20, "height": 30,
        "taken": "2024-06-01T12:30:00", "file_size": cam.stat().st_size,
        "sha256": hashlib.sha256(cam.read_bytes()).hexdigest(),
        "modified": datetime.fromtimestamp(1_700_000_000, timezone.utc).isoformat()}


def test_a_sidecar_key_wins_over_a_folder_fact_and_a_broken_image_keeps_its_name(tmp_path):
    make_image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "a.json").write_text('{"folder": "albums/summer", "stars": 4}')
    (tmp_path / "broken.png").write_bytes(b"not a png")
    found = {entry.path.name: entry.metadata for entry in collect([tmp_path]).images}
    assert found["a.png"]["folder"] == "albums/summer" and found["a.png"]["stars"] == 4
    assert set(found["broken.png"]) == {"folder", "file_name", "modified", "file_size", "sha256"}


@pytest.mark.parametrize("cell,value", [
    ("", None), ("  ", None), ("true", True), ("FALSE", False), ("3", 3), ("-2.5", -2.5),
    ("1e3", 1000.0), ("007", "007"), ("02134", "02134"), ("0.5", 0.5), ("2024-06-01",
                                                                        "2024-06-01"),
    ("a dog", "a dog"), ("3 dogs", "3 dogs")])
def test_csv_cells_are_typed_as_json_would_carry_them(cell, value):
    assert cell_value(cell) == value and type(cell_value(cell)) is type(value)


def test_a_csv_manifests_extra_columns_become_typed_metadata(tmp_path):
    make_image(tmp_path / "x.png", (5, 5, 5))
    (tmp_path / "rows.csv").write_text("image,caption,stars,public,shot,album\n"
                                       "x.png,a thing,4,true,2024-06-01,007\n")
    entry, = collect([tmp_path / "rows.csv"]).images
    assert {k: entry.metadata[k] for k in ("stars", "public", "shot", "album")} == {
        "stars": 4, "public": True, "shot": "2024-06-01", "album": "007"}


def test_a_png_is_scanned_from_its_header_without_decoding_its_pixels(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = "2023:01:02 03:04:05"
    exif[0x0112] = 1  # Pillow writes no eXIf chunk for an EXIF with no top-level tag
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "dated.png", exif=exif)
    Image.new("RGB", (50, 20), (9, 9, 9)).save(tmp_path / "plain.png")
    whole = (tmp_path / "plain.png").read_bytes()
    pixels_at = whole.index(b"IDAT") + 4
    (tmp_path / "plain.png").write_bytes(  # the pixels' zlib stream destroyed
        whole[:pixels_at] + bytes(len(whole) - pixels_at))
    found = {entry.path.name: entry.metadata for entry in collect([tmp_path]).images}
    assert (found["dated.png"]["width"], found["dated.png"]["taken"]) == (40, "2023-01-02T03:04:05")
    assert (found["plain.png"]["width"], found["plain.png"]["height"]) == (50, 20)
