"""`clipdex index …` end to end on real images, real FAISS and SQLite files, the tiny model."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from clipdex.main import main
from indexer.build import BuildConfig, build
from retrieval.models.inference import encode_texts
from retrieval.models.loading import load_model
from retrieval.store import open_generation
from tests.conftest import COLOURS, make_image

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "clipdex-tiny", "--device", "cpu", "--workers", "0"]


def folder_of_images(folder: Path, names: list[str]) -> Path:
    for name in names:
        make_image(folder / f"{name}.png", COLOURS.get(name, (90, 90, 90)))
    return folder


def run_build(*args: str) -> dict:
    return main(["index", "build", *args, *TINY])


def test_builds_from_a_folder_manifests_and_a_text_corpus(tmp_path, capsys):
    folder = folder_of_images(tmp_path / "photos", ["red", "green"])
    (folder / "red.txt").write_text("a red square\na crimson tile\n")
    (folder / "green.json").write_text(json.dumps({"caption": "a green square", "site": "x"}))
    make_image(tmp_path / "more" / "blue.png", COLOURS["blue"])
    (tmp_path / "more" / "rows.jsonl").write_text(
        json.dumps({"image": "blue.png", "caption": "a blue square", "owner": "ann"}) + "\n")
    make_image(tmp_path / "more" / "white.png", COLOURS["white"])
    pq.write_table(pa.table({"file": ["white.png"], "captions": [["snow", "a white tile"]],
                             "year": [2020]}), tmp_path / "more" / "white.parquet")
    (tmp_path / "corpus.txt").write_text("a poem about rain\n\na note on trains\n")
    out = tmp_path / "idx"
    assert run_build(str(folder), str(tmp_path / "more" / "rows.jsonl"),
                     str(tmp_path / "more" / "white.parquet"), str(tmp_path / "corpus.txt"),
                     "--out", str(out)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["texts"]) == (4, 8)  # 6 captions + 2 corpus lines
    with open_generation(out) as generation:
        records = generation.items(range(1, 13))
        by_path = {Path(r.path).name: r for r in records if r.modality == "image"}
        assert by_path["red.png"].captions == ["a red square", "a crimson tile"]
        green = by_path["green.png"].metadata  # a folder's facts, then its sidecar's keys
        assert {k: green[k] for k in ("site", "folder", "file_name", "width", "height")} == {
            "site": "x", "folder": "", "file_name": "green.png", "width": 48, "height": 40}
        assert by_path["blue.png"].metadata == {"owner": "ann"}
        assert by_path["white.png"].metadata == {"year": 2020}
        assert generation.fields() == {
            "file_name": "string", "file_size": "number", "folder": "string",
            "height": "number", "line": "number", "modified": "datetime", "owner": "string",
            "sha256": "string", "site": "string", "source": "string", "width": "number",
            "year": "number"}
        captions = [r for r in records if r.modality == "text" and r.image_id is not None]
        assert {generation.items([r.image_id])[0].path for r in captions} == {
            str(r.path) for r in by_path.values()}
        free = [r.text for r in records if r.modality == "text" and r.image_id is None]
        assert free == ["a poem about rain", "a note on trains"]
        # text->image, image->text and image->image are all answerable
        query = generation.vectors("image", [by_path["red.png"].id])
        assert generation.search("image", query, 1)[1][0, 0] == by_path["red.png"].id
        assert generation.search("text", query, 20)[1].shape == (1, 8)


def test_bad_images_are_skipped_and_reported(tmp_path, capsys):
    folder = folder_of_images(tmp_path / "zoo", ["red", "blue"])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_text("<html><body>not an image</body></html>")
    good = folder / "photo.jpg"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(good, quality=90)
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    Image.new("RGB", (120, 100), (1, 2, 3)).save(folder / "huge.png")
    (folder / "list.csv").write_text("image,caption\nred.png,a red one\nghost.png,nothing\n")
    out = tmp_path / "idx"
    assert main(["index", "build", str(folder), "--out", str(out), "--max-pixels", "5000",
                 "--model", "clipdex-tiny", "--workers", "1", "--batch-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["texts"]) == (3, 1)
    assert summary["skipped"] == {"empty_file": 1, "not_an_image": 1, "truncated": 1,
                                  "too_large": 1, "missing": 1}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {Path(e["path"]).name for e in errors} == {"empty.jpg", "page.jpg", "truncated.jpg",
                                                      "huge.png", "ghost.png"}
    assert all(e["reason"] for e in errors)


def _subprocess_build(args: list[str], fault: str) -> subprocess.Popen:
    env = {**os.environ, "CLIPDEX_FAULT": fault, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "clipdex", "index", "build", *args,
                             *TINY], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _expect_complete(out: Path, names: set[str]) -> None:
    with open_generation(out) as generation:
        images = [r for r in generation.items(range(1, 200)) if r and r.modality == "image"]
        assert sorted(r.id for r in images) == list(range(1, len(names) + 1))
        assert sorted(Path(r.path).stem for r in images) == sorted(names)
        assert generation.count("image") == len(names)


def test_a_build_killed_at_a_shard_resumes_without_duplicates(tmp_path, capsys):
    first = folder_of_images(tmp_path / "a", ["red", "green", "blue"])
    second = folder_of_images(tmp_path / "b", ["yellow", "purple", "black", "white", "orange"])
    out = tmp_path / "idx"
    assert run_build(str(first), "--out", str(out)) == 0
    args = [str(first), str(second), "--out", str(out), "--shard-size", "2"]
    process = _subprocess_build(args, "after_shard:2")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    _expect_complete(out, {"red", "green", "blue"})  # the last generation is intact
    capsys.readouterr()
    assert run_build(*args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_resumed"] == 3 and summary["shards_encoded"] == 1
    _expect_complete(out, set(COLOURS))
    assert not any((out / "work").iterdir())  # shards are dropped once the generation is in


def test_a_kill_before_the_switch_keeps_the_old_generation_current(colour_corpus, tmp_path):
    out = tmp_path / "idx"
    assert run_build(str(colour_corpus), "--out", str(out)) == 0
    extra = folder_of_images(tmp_path / "extra", ["grey"])
    process = _subprocess_build([str(colour_corpus), str(extra), "--out", str(out)],
                                "before_current")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert (out / "generations" / "000002").is_dir()  # complete, but never switched to
    with open_generation(out) as generation:
        assert generation.name == "000001" and generation.count("image") == 8
    assert run_build(str(colour_corpus), str(extra), "--out", str(out)) == 0
    names = sorted(p.name for p in (out / "generations").iterdir())
    assert names == ["000001", "000003"]  # the orphan went, the replaced one stays
    with open_generation(out) as generation:
        assert generation.count("image") == 9


def test_a_real_sigkill_mid_build_leaves_the_index_whole_and_resumes(tmp_path, capsys):
    folder = folder_of_images(tmp_path / "a", list(COLOURS))
    out = tmp_path / "idx"
    args = [str(folder), "--out", str(out), "--shard-size", "2"]
    process = _subprocess_build(args, "stall:after_shard:1")
    deadline = time.monotonic() + 240
    while not list(out.glob("work/*/images-00001.json")) and time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.communicate()[1].decode()[-2000:])
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "CURRENT").exists()
    assert run_build(*args) == 0
    assert json.loads(capsys.readouterr().out)["shards_resumed"] == 2
    _expect_complete(out, set(COLOURS))


def test_add_and_delete_keep_ids_stable_and_hide_deleted_items(colour_corpus, tmp_path, capsys):
    out = tmp_path / "idx"
    assert run_build(str(colour_corpus), "--out", str(out)) == 0
    with open_generation(out) as generation:
        before = {r.path: r.id for r in generation.items(range(1, 9))}
        next_id = generation.next_id
    extra = folder_of_images(tmp_path / "extra", ["grey1", "grey2"])
    capsys.readouterr()
    assert main(["index", "add", str(extra), str(colour_corpus), "--index", str(out), *TINY]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2  # the corpus is already there
    red = str((tmp_path / "img" / "red.png").resolve())
    assert main(["index", "delete", "--index", str(out), "--path", red]) == 0
    assert main(["index", "delete", "--index", str(out), "--id", str(before[
        str((tmp_path / "img" / "blue.png").resolve())])]) == 0
    with open_generation(out) as generation:
        assert generation.name == "000004"
        alive = {r.path: r.id for r in generation.items(range(1, 40)) if r and r.path}
        assert {p: i for p, i in before.items() if p in alive} == {
            p: i for p, i in alive.items() if p in before}  # old ids unchanged
        assert min(i for p, i in alive.items() if p not in before) >= next_id
        gone = {before[red], before[str((tmp_path / "img" / "blue.png").resolve())]}
        queries = generation.vectors("image", list(alive.values()))
        _, ids = generation.search("image", queries, k=50)
        assert ids.shape == (8, 8) and not gone & set(ids.ravel().tolist())
        _, ids = generation.search("text", queries, k=50)
        texts = generation.items(ids[0].tolist())
        assert all(t.image_id not in gone for t in texts)
    assert main(["index", "compact", "--index", str(out)]) == 0
    with open_generation(out) as generation:
        assert generation.manifest["modalities"]["image"]["deleted"] == 0
        assert generation.count("image") == 8


def test_a_different_model_is_refused_naming_the_model_field(tiny, colour_corpus, tmp_path,
                                                             capsys):
    out = tmp_path / "idx"
    other = copy.deepcopy(tiny)  # same architecture, different weights
    other.model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        other.model.logit_scale.add_(1.0)
    build([colour_corpus], out, other, BuildConfig(workers=0))
    assert main(["index", "add", str(colour_corpus), "--index", str(out), *TINY]) == 2
    assert "index was built with model sha256" in capsys.readouterr().err


def test_info_prints_the_manifest(colour_corpus, tmp_path, capsys):
    out = tmp_path / "idx"
    assert run_build(str(colour_corpus), "--out", str(out)) == 0
    capsys.readouterr()
    assert main(["index", "info", str(out)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["modalities"]["image"]["index"]["kind"] == "flat"
    assert manifest["model"]["arch"] == "clipdex-tiny" and manifest["embed_dim"] == 32


def test_a_relative_index_path_works(colour_corpus, tmp_path, monkeypatch, capsys):
    """`make run` passes data/demo-index: relative paths must open (SQLite URIs need absolute)."""
    monkeypatch.chdir(tmp_path)
    assert run_build(str(colour_corpus), "--out", "idx") == 0
    generation = open_generation(Path("idx"))
    assert generation.count("image") == 8
    generation.close()


def test_adding_only_broken_files_reports_them_and_keeps_the_index(colour_corpus, tmp_path,
                                                                     capsys):
    out = tmp_path / "idx"
    assert run_build(str(colour_corpus), "--out", str(out)) == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (broken / "b.jpg").write_bytes(b"")
    capsys.readouterr()
    assert main(["index", "add", str(broken), "--index", str(out), *TINY]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 0 and sum(summary["skipped"].values()) == 2
    with open_generation(out) as generation:
        assert generation.count("image") == 8


def test_a_killed_add_leaves_no_shards_behind_once_another_generation_lands(colour_corpus,
                                                                             tmp_path):
    out = tmp_path / "idx"
    assert run_build(str(colour_corpus), "--out", str(out)) == 0
    extra = folder_of_images(tmp_path / "extra", ["grey1", "grey2", "grey3"])
    process = subprocess.Popen(
        [sys.executable, "-m", "clipdex", "index", "add", str(extra), "--index", str(out),
         "--shard-size", "1", *TINY], env={**os.environ, "CLIPDEX_FAULT": "after_shard:0",
                                           "PYTHONPATH": str(ROOT)},
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert len(list((out / "work").iterdir())) == 1  # the killed add's shards
    # a different job commits first, so the killed add's parent is history
    assert main(["index", "add", str(folder_of_images(tmp_path / "x", ["grey9"])),
                 "--index", str(out), *TINY]) == 0
    assert list((out / "work").iterdir()) == []


def test_a_build_hands_the_store_vectors_on_disk_and_records_a_batch_at_a_time(
        tmp_path, capsys, monkeypatch):
    """A build of millions of images never gathers their embeddings or records: the store
    reads the vectors memory-mapped from the work folder and takes the records in batches.
    Captions stay linked to their images across batch edges, a broken image's caption
    stays as a text of its own, and the vectors are the ones encoded."""
    import indexer.build
    import indexer.shards

    names = ["red", "green", "blue", "white", "black"]
    folder = folder_of_images(tmp_path / "photos", names)
    for name in names:
        (folder / f"{name}.txt").write_text(f"a {name} square\na {name} tile\n")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a caption of nothing\n")
    (tmp_path / "corpus.txt").write_text("a poem\nan essay\na list\n")
    monkeypatch.setattr(indexer.shards, "RECORD_BATCH", 2)
    handed: dict = {}
    real = indexer.build.write_generation

    def spy(root, model, records, vectors, *rest):
        handed["vectors"] = {m: type(v) for m, v in vectors.items()}
        handed["batches"] = [len(batch) for batch in records.batches()]
        return real(root, model, records, vectors, *rest)

    monkeypatch.setattr(indexer.build, "write_generation", spy)
    out = tmp_path / "idx"
    assert run_build(str(folder), str(tmp_path / "corpus.txt"), "--out", str(out),
                     "--shard-size", "3") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["texts"]) == (5, 14)  # 10 + 1 orphan + 3 corpus
    assert handed["vectors"] == {"image": np.memmap, "text": np.memmap}
    assert len(handed["batches"]) >= 4 and sum(handed["batches"]) == 19
    assert not list((out / "work").glob("staged-*"))
    with open_generation(out) as generation:
        records = {r.id: r for r in generation.items(range(1, 20))}
        images = {Path(r.path).stem: r for r in records.values() if r.modality == "image"}
        assert sorted(images) == sorted(names) and max(r.id for r in images.values()) == 5
        for name, image in images.items():
            assert image.captions == [f"a {name} square", f"a {name} tile"]
            linked = [r.text for r in records.values() if r.image_id == image.id]
            assert linked == image.captions
        orphan = next(r for r in records.values() if r.text == "a caption of nothing")
        assert orphan.image_id is None and orphan.id > 5
        ids, vectors = generation.all_vectors("text")
        poem = next(r.id for r in records.values() if r.text == "a poem")
        clip = load_model("clipdex-tiny", "cpu")
        expected = encode_texts(clip, ["a poem"])[0]
        np.testing.assert_allclose(vectors[list(ids).index(poem)], expected, atol=1e-5)
