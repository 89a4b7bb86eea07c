"""`clipdex train` end to end on a tiny real corpus with the real towers."""

import csv
import json

import torch

from clipdex.main import main
from retrieval.inputs.captions import read_manifest
from retrieval.models.loading import load_model
from retrieval.training.config import TrainConfig
from retrieval.training.train import train


def _log_rows(out):
    with open(out / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _args(manifest, out, *extra):
    return ["train", "--manifest", str(manifest), "--model", "clipdex-effnet-minilm",
            "--out", str(out), "--batch-size", "4", "--unlocked-text-layers", "1",
            "--workers", "0", "--lr", "5e-3", *extra]


def test_train_writes_checkpoints_log_plot_and_error_report(colour_corpus, tmp_path):
    (colour_corpus.parent / "img" / "black.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    assert main(_args(colour_corpus, out, "--epochs", "2")) == 0
    rows = _log_rows(out)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"loss", "t2i_R@1", "i2t_R@10", "temperature"} <= set(rows[0])
    assert (out / "training.png").stat().st_size > 1000
    for name in ("epoch_001", "epoch_002", "best", "last"):
        assert (out / f"{name}.safetensors").exists() and (out / f"{name}.card.json").exists()
    card = json.loads((out / "best.card.json").read_text())
    assert card["weights"] == "partial" and card["init"] == "towers"
    assert "clipdex train" in card["command"]
    assert "validation" in card["evaluation"]
    problems = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert any(p["path"].endswith("black.png") and "cannot decode" in p["reason"]
               for p in problems)
    trained = load_model(str(out / "best.safetensors"), device="cpu")
    assert trained.card["training"]["epoch"] in (1, 2)


def test_resume_continues_from_the_last_epoch(colour_corpus, tmp_path):
    out = tmp_path / "run"
    assert main(_args(colour_corpus, out, "--epochs", "1")) == 0
    assert main(_args(colour_corpus, out, "--epochs", "2")) == 2  # refuses to overwrite
    assert main(_args(colour_corpus, out, "--epochs", "2", "--resume")) == 0
    rows = _log_rows(out)
    assert [row["epoch"] for row in rows] == ["1", "2"]


def test_loss_goes_down_on_a_tiny_corpus(colour_corpus, tmp_path):
    clip = load_model("clipdex-effnet-minilm", device="cpu")
    manifest = read_manifest(colour_corpus)
    config = TrainConfig(out=tmp_path / "run", epochs=6, batch_size=8, lr=1e-2,
                         unlocked_text_layers=0, workers=0)
    train(clip, manifest, manifest, config)
    rows = _log_rows(tmp_path / "run")
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) * 0.8


def test_open_clip_towers_train_whole_with_streamed_pixels(colour_corpus, tmp_path):
    """The tiny model has no cached split: pixels stream from workers, both towers train."""
    clip = load_model("clipdex-tiny", device="cpu")
    manifest = read_manifest(colour_corpus)
    (colour_corpus.parent / "img" / "white.png").write_bytes(b"")  # dropped from its batch
    config = TrainConfig(out=tmp_path / "run", epochs=3, batch_size=4, lr=1e-3,
                         lock_image=False, unlocked_text_layers=2, workers=0)
    before = clip.model.visual.conv1.weight.detach().clone()
    train(clip, manifest, manifest, config)
    assert not torch.equal(before, clip.model.visual.conv1.weight)
    rows = _log_rows(tmp_path / "run")
    assert len(rows) == 3 and float(rows[0]["t2i_R@10"]) > 0
    problems = (tmp_path / "run" / "errors.jsonl").read_text()
    assert "white.png" in problems


def test_locked_open_clip_image_tower_is_cached_whole(colour_corpus, tmp_path):
    clip = load_model("clipdex-tiny", device="cpu")
    before = clip.model.visual.conv1.weight.detach().clone()
    config = TrainConfig(out=tmp_path / "run", epochs=1, batch_size=4, workers=0)
    train(clip, read_manifest(colour_corpus), read_manifest(colour_corpus), config)
    assert torch.equal(before, clip.model.visual.conv1.weight)
