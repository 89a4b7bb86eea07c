import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval.errors import ManifestError
from retrieval.inputs.captions import read_manifest, read_split
from tests.conftest import make_image


def test_csv_rows_of_one_image_are_merged_and_paths_resolve_to_the_manifest(colour_corpus):
    manifest = read_manifest(colour_corpus)
    assert len(manifest.items) == 8 and manifest.num_captions == 16
    red = next(item for item in manifest.items if item.image.name == "red.png")
    assert red.image == colour_corpus.parent / "img" / "red.png"
    assert red.captions == ["a red square", "something coloured red"]
    assert red.label == "red"


def test_jsonl_with_caption_lists_and_metadata(tmp_path):
    make_image(tmp_path / "a.png", (10, 20, 30))
    lines = [{"path": "a.png", "captions": ["one", "two"], "photographer": "Ann"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(row) for row in lines))
    item = read_manifest(tmp_path / "m.jsonl").items[0]
    assert item.captions == ["one", "two"]
    assert item.metadata == {"photographer": "Ann"}


def test_parquet_manifest_with_image_root(tmp_path):
    make_image(tmp_path / "pics" / "b.png", (200, 20, 30))
    table = pa.table({"image": ["b.png", "b.png"], "caption": ["x", "y"]})
    pq.write_table(table, tmp_path / "m.parquet")
    manifest = read_manifest(tmp_path / "m.parquet", image_root=tmp_path / "pics")
    assert manifest.items[0].captions == ["x", "y"]


def test_missing_image_is_reported_with_its_path_and_skipped(colour_corpus):
    (colour_corpus.parent / "img" / "red.png").unlink()
    manifest = read_manifest(colour_corpus)
    assert len(manifest.items) == 7
    assert [problem.path for problem in manifest.problems] == [
        str(colour_corpus.parent / "img" / "red.png")]
    assert "not found" in manifest.problems[0].reason


def test_split_file_keeps_listed_images(colour_corpus, tmp_path):
    (tmp_path / "split.txt").write_text("red.png\nblue.png\n")
    manifest = read_manifest(colour_corpus, split=read_split(tmp_path / "split.txt"))
    assert sorted(item.image.name for item in manifest.items) == ["blue.png", "red.png"]


def test_bad_json_line_names_file_and_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.png"}\n{oops\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2: not valid JSON"):
        read_manifest(tmp_path / "m.jsonl")


def test_missing_image_column_lists_the_columns(tmp_path):
    (tmp_path / "m.csv").write_text("picture,caption\na.png,x\n")
    with pytest.raises(ManifestError, match=r"m.csv: no image column.*picture"):
        read_manifest(tmp_path / "m.csv")
    manifest = read_manifest(tmp_path / "m.csv", image_column="picture")
    assert manifest.problems[0].path.endswith("a.png")


def test_unknown_extension_and_absent_file(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "m.xml").write_text("<x/>")
    with pytest.raises(ManifestError, match="unknown manifest type"):
        read_manifest(tmp_path / "m.xml")
