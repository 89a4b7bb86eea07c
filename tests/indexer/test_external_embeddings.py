"""`clipdex index build --from-embeddings`: clip-retrieval's inference output becomes a
generation without encoding; every vector stored is the one given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipdex.main import main
from indexer.external_embeddings import ExternalModel, build_from_embeddings, find_shards
from retrieval.errors import ExternalModelError, ManifestError
from retrieval.models.identity import model_identity
from retrieval.store import (
    StoreOptions,
    open_generation,
    read_generation_manifest,
    update_generation,
)
from tests.indexer.helpers import Partition, sample_partitions, stacked, write_clip_retrieval

DIM = 16


def _build(capsys, folder: Path, out: Path, *extra: str) -> dict:
    code = main(["index", "build", "--from-embeddings", str(folder), "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_clip_retrieval_output_becomes_a_generation_with_the_same_vectors(tmp_path, capsys):
    partitions = sample_partitions(DIM, sizes=(5, 3), image_root=tmp_path / "photos")
    folder = write_clip_retrieval(tmp_path / "embeddings", partitions)
    summary = _build(capsys, folder, tmp_path / "idx", "--model", "external:ViT-B-32:openai",
                     "--media-root", str(tmp_path / "photos"))
    assert (summary["images"], summary["texts"], summary["shards_read"]) == (8, 8, 2)
    assert summary["outside_media_roots"] == 0
    assert summary["skipped"] == {}
    with open_generation(tmp_path / "idx") as generation:
        image_ids, image_vectors = generation.all_vectors("image")
        text_ids, text_vectors = generation.all_vectors("text")
        # images 1..8 in partition and row order, then their captions 9..16
        assert image_ids.tolist() == list(range(1, 9)) and text_ids.tolist() == list(range(9, 17))
        np.testing.assert_array_equal(image_vectors, stacked(partitions, "images"))
        np.testing.assert_array_equal(text_vectors, stacked(partitions, "texts"))
        first, caption = generation.items([1, 9])
    row = partitions[0].rows[0]
    assert first.path == row["image_path"] and first.captions == [row["caption"]]
    assert first.metadata == {"url": row["url"], "key": row["key"]}
    assert (caption.text, caption.image_id) == (row["caption"], 1)


def test_external_model_is_recorded_and_refused_by_every_loadable_model(tmp_path, tiny,
                                                                        capsys):
    folder = write_clip_retrieval(tmp_path / "e", sample_partitions(DIM))
    build_from_embeddings(folder, tmp_path / "idx", ExternalModel("ViT-L-14:openai"))
    model = read_generation_manifest(tmp_path / "idx").model
    assert model.external and (model.arch, model.embed_dim) == ("ViT-L-14:openai", DIM)
    with pytest.raises(ExternalModelError, match="ViT-L-14:openai.*text and image queries"):
        open_generation(tmp_path / "idx", model_identity(tiny).sha256)
    assert main(["search", "--index", str(tmp_path / "idx"), "a cat"]) == 2
    assert "'ViT-L-14:openai'" in capsys.readouterr().err
    assert main(["index", "add", str(folder), "--index", str(tmp_path / "idx"),
                 "--model", "clipdex-tiny", "--device", "cpu"]) == 2
    assert "new texts and images, need that model" in capsys.readouterr().err
    # its own identity still opens it: delete and compact work on such an index
    update_generation(tmp_path / "idx", model, delete_ids=[1])
    with open_generation(tmp_path / "idx", model.sha256, model.embed_dim) as generation:
        assert (generation.count("image"), generation.count("text")) == (7, 7)


def test_a_named_model_is_recorded_after_its_dimension_is_checked(tmp_path, tiny, capsys):
    folder = write_clip_retrieval(tmp_path / "e", sample_partitions(tiny.embed_dim))
    _build(capsys, folder, tmp_path / "idx", "--model", "clipdex-tiny", "--device", "cpu")
    assert read_generation_manifest(tmp_path / "idx").model == model_identity(tiny)
    wrong = write_clip_retrieval(tmp_path / "wrong", sample_partitions(DIM))
    code = main(["index", "build", "--from-embeddings", str(wrong), "--out",
                 str(tmp_path / "other"), "--model", "clipdex-tiny", "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2 and f"dimension {DIM}" in error and "external:NAME" in error


def test_the_model_must_be_named(tmp_path, capsys):
    folder = write_clip_retrieval(tmp_path / "e", sample_partitions(DIM))
    code = main(["index", "build", "--from-embeddings", str(folder), "--out", str(tmp_path / "i")])
    assert code == 2 and "needs --model" in capsys.readouterr().err


def test_captions_without_text_embeddings_are_skipped_and_counted(tmp_path, capsys):
    partitions = sample_partitions(DIM, sizes=(4, 3))
    partitions[1].texts = None  # that partition's text_emb file is missing
    folder = write_clip_retrieval(tmp_path / "e", partitions)
    summary = _build(capsys, folder, tmp_path / "idx", "--model", "external:m")
    assert (summary["images"], summary["texts"]) == (7, 4)
    assert summary["skipped"] == {"caption_without_text_embedding": 3}
    report = [json.loads(line) for line in Path(summary["errors_file"]).read_text().splitlines()]
    assert [(r["kind"], r["count"]) for r in report] == [("caption_without_text_embedding", 3)]
    assert report[0]["path"].endswith("metadata_1.parquet")
    with open_generation(tmp_path / "idx") as generation:
        image = generation.items([1])[0]
        assert image.path is None and image.metadata["image_path"] == "000000000"


def test_text_only_inference_gives_free_texts(tmp_path, capsys):
    partitions = sample_partitions(DIM, sizes=(3,))
    partitions[0].images = None
    for row in partitions[0].rows:
        del row["image_path"]
    folder = write_clip_retrieval(tmp_path / "e", partitions)
    summary = _build(capsys, folder, tmp_path / "idx", "--model", "external:m")
    assert (summary["images"], summary["texts"]) == (0, 3)
    with open_generation(tmp_path / "idx") as generation:
        text = generation.items([1])[0]
        assert text.image_id is None and text.metadata["url"].startswith("https://")


def test_bad_rows_are_skipped_and_off_norm_rows_rescaled(tmp_path, capsys):
    partitions = sample_partitions(DIM, sizes=(4,))
    images = partitions[0].images.astype(np.float32)
    images[1] = 0.0
    images[2] *= 3.0
    partitions[0].images = images
    folder = write_clip_retrieval(tmp_path / "e", partitions)
    summary = _build(capsys, folder, tmp_path / "idx", "--model", "external:m")
    assert summary["images"] == 3 and summary["skipped"] == {"bad_vector": 1}
    with open_generation(tmp_path / "idx") as generation:
        _, stored = generation.all_vectors("image")
        texts = generation.items(range(4, 8))
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-3)
    # the caption of the skipped image stays, as a text of its own
    assert [t.image_id for t in texts] == [1, None, 2, 3]


def test_misaligned_or_mixed_folders_are_refused_naming_the_file(tmp_path):
    partitions = sample_partitions(DIM, sizes=(4, 3))
    partitions[1].images = partitions[1].images[:2]
    folder = write_clip_retrieval(tmp_path / "rows", partitions)
    with pytest.raises(ManifestError, match=r"img_emb_1\.npy has 2 rows.*metadata_1\.parquet"):
        find_shards(folder)
    mixed = sample_partitions(DIM, sizes=(2, 2))
    mixed[1] = Partition(mixed[1].rows, np.ones((2, DIM + 1), np.float16), None)
    with pytest.raises(ManifestError, match=rf"img_emb_1\.npy has dimension {DIM + 1}"):
        find_shards(write_clip_retrieval(tmp_path / "mixed", mixed))
    with pytest.raises(ManifestError, match="no metadata/ folder"):
        find_shards(tmp_path)
    orphan = write_clip_retrieval(tmp_path / "orphan", sample_partitions(DIM, sizes=(2,)))
    np.save(orphan / "img_emb" / "img_emb_1.npy", np.ones((2, DIM), np.float16))
    with pytest.raises(ManifestError, match=r"img_emb_1\.npy has no metadata"):
        find_shards(orphan)


def test_an_import_loads_no_model_code(tmp_path):
    """A corpus of embeddings needs no encoder: the import runs without torch (~130 MB
    resident instead of ~800 MB before an index is even opened)."""
    folder = write_clip_retrieval(tmp_path / "embeddings", sample_partitions(DIM, sizes=(3,)))
    script = ("import sys\nfrom clipdex.main import main\n"
              f"code = main(['index', 'build', '--from-embeddings', {str(folder)!r}, '--out', "
              f"{str(tmp_path / 'idx')!r}, '--model', 'external:x'])\n"
              "assert code == 0\nprint(sorted(m for m in ('torch', 'open_clip', 'onnxruntime') "
              "if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_lower_recall_target_tunes_a_faster_search_and_is_recorded(tmp_path, capsys):
    folder = write_clip_retrieval(tmp_path / "embeddings",
                                  sample_partitions(DIM, sizes=(1500, 1500)))
    tuned = {}
    for target in ("0.99", "0.6"):
        out = tmp_path / f"idx-{target}"
        _build(capsys, folder, out, "--model", "external:x", "--index-type", "ivfpq",
               "--target-recall", target)
        with open_generation(out) as generation:
            tuned[target] = generation.manifest["modalities"]["image"]["tuning"]
    assert tuned["0.99"]["target"] == 0.99 and tuned["0.6"]["target"] == 0.6
    assert tuned["0.6"]["tuning_recall_at_10"] >= 0.6
    assert tuned["0.6"]["value"] < tuned["0.99"]["value"]  # fewer lists probed

    # later updates keep the target the index was built for, unless given another
    out = tmp_path / "idx-0.6"
    model = read_generation_manifest(out).model
    update_generation(out, model, delete_ids=[1])
    assert read_generation_manifest(out).section("image")["tuning"]["target"] == 0.6
    update_generation(out, model, delete_ids=[2], options=StoreOptions(target_recall=0.9))
    assert read_generation_manifest(out).section("image")["tuning"]["target"] == 0.9

    for bad in ("0", "1.5"):
        assert main(["index", "build", "--from-embeddings", str(folder), "--out",
                     str(tmp_path / "bad"), "--model", "external:x",
                     "--target-recall", bad]) == 2
        assert "--target-recall must be above 0 and at most 1" in capsys.readouterr().err
    assert main(["index", "build", "--from-embeddings", str(folder), "--out",
                 str(tmp_path / "bad"), "--model", "external:x", "--max-memory", "4 gallons"]) == 2
    assert "--max-memory: cannot read memory size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
