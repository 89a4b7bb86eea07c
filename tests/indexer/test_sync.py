"""`index sync`: the index follows its folder in one generation: new files added, edited ones
re-encoded, moved ones kept with their ids, deleted ones removed, touched ones only hashed,
and a folder that did not change costs no generation (real files, the tiny model, a real
FAISS index and SQLite file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.build import BuildConfig, build
from indexer.selection import Selection
from indexer.sync import sync
from retrieval.errors import ManifestError
from retrieval.fields.filters import parse_filter
from retrieval.models.inference import encode_images
from retrieval.store import open_generation
from tests.conftest import COLOURS, make_image
from tests.support.formats import encoded

CONFIG = BuildConfig(workers=0)


def never():
    raise AssertionError("nothing needed encoding, yet the model was loaded")


@pytest.fixture
def album(tmp_path: Path, tiny) -> tuple[Path, Path]:
    photos = tmp_path / "photos"
    for name in ("red", "green", "blue", "yellow", "purple"):
        make_image(photos / f"{name}.png", COLOURS[name])
    index = tmp_path / "index"
    build([photos], index, tiny, CONFIG)
    return photos, index


def ids_by_name(index: Path) -> dict[str, int]:
    with open_generation(index) as generation:
        found = generation.image_files(str(index.parent / "photos"))
    return {Path(path).name: item_id for item_id, path, _ in found}


def test_a_sync_follows_edits_deletions_moves_and_new_files(album, tiny):
    photos, index = album
    before = ids_by_name(index)
    Image.open(photos / "red.png").rotate(90).save(photos / "red.png")  # edited
    (photos / "green.png").unlink()  # deleted
    (photos / "trips").mkdir()
    (photos / "blue.png").rename(photos / "trips" / "sea.png")  # moved
    os.utime(photos / "yellow.png", (1_800_000_000, 1_800_000_000))  # touched
    make_image(photos / "white.png", COLOURS["white"])  # new
    make_image(photos / "trips" / "black.png", COLOURS["black"])  # new
    (photos / "phone.heic").write_bytes(encoded(Image.new("RGB", (64, 48), COLOURS["orange"]),
                                                "HEIF"))  # new, as a phone writes it

    report = sync([photos], index, lambda: tiny, CONFIG)

    assert (report.added, report.changed, report.moved, report.removed) == (3, 1, 1, 1)
    assert (report.unchanged, report.touched) == (2, 1) and report.generation is not None
    after = ids_by_name(index)
    assert set(after) == {"red.png", "sea.png", "yellow.png", "purple.png", "white.png",
                          "black.png", "phone.heic"}
    assert after["sea.png"] == before["blue.png"]  # moved: same id, same embedding
    assert after["yellow.png"] == before["yellow.png"] and after["purple.png"] == before[
        "purple.png"]
    assert after["red.png"] != before["red.png"]  # re-encoded under a new id
    with open_generation(index) as generation:
        # the stored vectors are the files' embeddings now: the edited one too
        stored = generation.vectors("image", [after["red.png"], after["white.png"]])
        fresh = encode_images(tiny, [photos / "red.png", photos / "white.png"])
        assert np.allclose(stored, fresh, atol=1e-3)  # the indexer decodes to uint8 first
        sea = generation.items([after["sea.png"]])[0]
        assert sea.metadata["folder"] == "trips" and sea.metadata["file_name"] == "sea.png"
        # the moved item's words and fields follow it
        ids, _ = generation.keyword("image", "sea", None, 5)
        assert after["sea.png"] in ids.tolist()
        assert set(generation.matching_ids(
            "image", parse_filter({"field": "folder", "eq": "trips"}, generation.fields()))
        ) == {after["sea.png"], after["black.png"]}
    again = sync([photos], index, never, CONFIG)
    assert again.generation is None and again.unchanged == 7  # nothing to do: no generation


def test_a_dry_run_reports_and_writes_nothing(album):
    photos, index = album
    (photos / "red.png").unlink()
    current = (index / "CURRENT").read_text()
    report = sync([photos], index, never, CONFIG, dry_run=True)
    assert report.removed == 1 and report.dry_run and report.generation is None
    assert (index / "CURRENT").read_text() == current


def test_excluded_and_hidden_files_are_left_out_and_counted(album, tiny):
    photos, index = album
    make_image(photos / ".thumbs" / "t1.png", COLOURS["white"])
    make_image(photos / ".hidden.png", COLOURS["white"])
    make_image(photos / "raw" / "a.png", COLOURS["black"])
    make_image(photos / "b.tmp.png", COLOURS["orange"])
    (photos / ".clipdexignore").write_text("raw/\n")
    report = sync([photos], index, lambda: tiny, CONFIG,
                  Selection(exclude=("*.tmp.png",)))
    assert report.added == 0 and report.excluded == 4  # .thumbs/, .hidden.png, raw/, b.tmp.png
    report = sync([photos], index, lambda: tiny, CONFIG,
                  Selection(exclude=("*.tmp.png",), include_hidden=True))
    assert report.added == 2 and report.excluded == 2  # the hidden ones are in now


def test_a_missing_folder_is_never_taken_for_everything_deleted(album):
    photos, index = album
    photos.rename(photos.with_name("unmounted"))
    with pytest.raises(ManifestError, match="missing"):
        sync([photos], index, never, CONFIG)
    with pytest.raises(ManifestError, match="follows folders"):
        sync([photos.with_name("unmounted") / "red.png"], index, never, CONFIG)


def test_the_command_reports_as_json(album):
    photos, index = album
    (photos / "purple.png").unlink()
    done = subprocess.run([sys.executable, "-m", "clipdex", "index", "sync", str(photos),
                           "--index", str(index), "--json", "--model", "clipdex-tiny",
                           "--device", "cpu"], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert report["removed"] == 1 and report["unchanged"] == 4 and report["generation"]
    assert "removed 1" in done.stderr
