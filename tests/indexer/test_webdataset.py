"""Webdataset tar shards (img2dataset's output) as an index source: images decoded from their
byte ranges, captions and metadata from the .txt / .json members, broken members reported."""

from __future__ import annotations

import json
import tarfile

import numpy as np

from clipdex.main import main
from indexer.build import BuildConfig, Job, build
from indexer.sources import collect
from indexer.webdataset import split_key
from retrieval.models.identity import model_identity
from retrieval.models.inference import encode_images
from retrieval.store import open_generation
from tests.conftest import COLOURS
from tests.indexer.helpers import image_bytes, img2dataset_shard, write_shard

TINY = ["--model", "clipdex-tiny", "--device", "cpu", "--workers", "0"]


def test_a_shard_gives_images_with_captions_and_metadata(tmp_path, capsys):
    shard = img2dataset_shard(tmp_path / "shards" / "00000.tar", 0, ["red", "green"])
    img2dataset_shard(tmp_path / "shards" / "00001.tar", 2, ["blue"])
    out = tmp_path / "idx"
    assert main(["index", "build", str(tmp_path / "shards"), "--out", str(out), *TINY]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["texts"]) == (3, 3)  # the caption is kept once
    with open_generation(out) as generation:
        records = generation.items(range(1, 7))
        red = records[0]
        assert red.path == str(shard.resolve() / "000000000.jpg")
        assert red.captions == ["a red square"]
        assert red.metadata == {"url": "https://example.com/000000000.jpg", "key": "000000000",
                                "status": "success", "width": 40, "shard": "00000.tar"}
        assert [r.metadata["shard"] for r in records[:3]] == ["00000.tar", "00000.tar",
                                                                "00001.tar"]
        assert [r.image_id for r in records[3:]] == [1, 2, 3]


def test_members_decode_like_the_same_files_on_disk(tiny, tmp_path):
    """The tar member's bytes go through the one decoder: the same embedding as the file."""
    data = image_bytes(COLOURS["purple"], "PNG")
    shard = write_shard(tmp_path / "s.tar", [("a/b.c.png", data), ("a/b.c.txt", b"one\ntwo\n")])
    (tmp_path / "b.png").write_bytes(data)
    out = tmp_path / "idx"
    build([shard], out, tiny, BuildConfig(workers=0))
    with open_generation(out) as generation:
        record = generation.items([1])[0]
        assert record.captions == ["one", "two"] and record.metadata["key"] == "a/b"
        stored = generation.vectors("image", [1])[0]
    np.testing.assert_allclose(stored, encode_images(tiny, [tmp_path / "b.png"])[0], atol=1e-5)


def test_broken_members_are_skipped_and_reported(tmp_path, capsys):
    good = image_bytes(COLOURS["red"])
    shard = write_shard(tmp_path / "mixed.tar", [
        ("0.jpg", good), ("0.txt", b"fine"),
        ("1.jpg", b"<html>not an image</html>"), ("1.txt", b"a page"),
        ("2.jpg", b""),
        ("3.jpg", good[: len(good) // 2]),
        ("4.txt", b"a caption with no image"),
        ("5.jpg", good), ("5.json", b"{not json"),
    ])
    out = tmp_path / "idx"
    assert main(["index", "build", str(shard), "--out", str(out), *TINY]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 2
    skipped = summary["skipped"]
    half = skipped.pop("truncated", 0) + skipped.pop("corrupt", 0)  # Pillow says either
    assert (skipped, half) == ({"not_an_image": 1, "empty_file": 1, "other": 2}, 1)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    where = {e["path"].removeprefix(str(shard.resolve()) + "/") for e in errors}
    assert where == {"1.jpg", "2.jpg", "3.jpg", "4", "5.json"}


def test_a_damaged_archive_keeps_the_samples_before_the_damage(tiny, tmp_path):
    shard = img2dataset_shard(tmp_path / "s.tar", 0, ["red", "green", "blue"])
    with tarfile.open(shard) as tar:
        third = tar.getmember("000000002.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: third.offset_data + 100])  # in the third image
    out = tmp_path / "idx"
    summary = build([cut], out, tiny, BuildConfig(workers=0))
    assert summary.images == 2
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["path"] for e in errors] == [str(cut.resolve()), str(cut.resolve() / "000000002.jpg")]
    assert "unreadable tar" in errors[0]["reason"] and "truncated" in errors[1]["reason"]


def test_the_job_hash_covers_the_shard_files(tiny, tmp_path):
    """A rewritten shard is another job: its old shards are not resumed."""
    shard = img2dataset_shard(tmp_path / "s.tar", 0, ["red"])
    identity = model_identity(tiny)

    def job_name() -> str:
        return Job(tmp_path / "idx", identity, collect([shard]), BuildConfig(), None).work.path.name

    before = job_name()
    img2dataset_shard(shard, 0, ["red", "green"])
    assert job_name() != before


def test_add_takes_only_new_samples_and_keys_split_at_the_first_dot(tmp_path, capsys):
    first = img2dataset_shard(tmp_path / "s" / "00000.tar", 0, ["red"])
    out = tmp_path / "idx"
    assert main(["index", "build", str(first), "--out", str(out), *TINY]) == 0
    second = img2dataset_shard(tmp_path / "s" / "00001.tar", 1, ["green", "blue"])
    capsys.readouterr()
    assert main(["index", "add", str(tmp_path / "s"), "--index", str(out), *TINY]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2  # 00000.tar's sample is known
    with open_generation(out) as generation:
        assert generation.count("image") == 3
        paths = {r.path for r in generation.items(range(1, 12)) if r and r.modality == "image"}
    assert paths == {str(first.resolve() / "000000000.jpg"),
                     *(str(second.resolve() / f"00000000{n}.jpg") for n in (1, 2))}
    assert split_key("part/0001.seg.jpg") == ("part/0001", "seg.jpg")
