"""Cached augmented views of the training images (`clipdex train --image-views`)."""

from __future__ import annotations

import torch
from PIL import Image, ImageOps

from clipdex.main import main
from retrieval.inputs.captions import read_manifest
from retrieval.training.config import TrainConfig
from retrieval.training.features import prepare_features, view_transform


def test_view_one_is_the_mirror_image_and_later_views_are_crops(towers, colour_corpus):
    image = Image.open(colour_corpus.parent / "img" / "red.png").convert("RGB")
    mirrored = towers.preprocess(ImageOps.mirror(image))
    torch.testing.assert_close(view_transform(towers, 1)(image), mirrored)
    assert view_transform(towers, 0) is towers.preprocess
    assert view_transform(towers, 2)(image).shape == mirrored.shape


def test_views_are_cached_once_each_and_reused(towers, colour_corpus, tmp_path):
    config = TrainConfig(out=tmp_path / "run", workers=0, cache_dir=tmp_path / "cache")
    feats, _ = prepare_features(towers, read_manifest(colour_corpus), config, views=3)
    assert len(feats.image_views) == 2
    assert all(view.shape == feats.image.shape for view in feats.image_views)
    assert not torch.equal(feats.image_views[0], feats.image)
    assert len(list((tmp_path / "cache").iterdir())) == 3
    again, _ = prepare_features(towers, read_manifest(colour_corpus), config, views=3)
    torch.testing.assert_close(again.image_views[1], feats.image_views[1])


def test_train_with_views(colour_corpus, tmp_path):
    assert main(["train", "--manifest", str(colour_corpus), "--model", "clipdex-effnet-minilm",
                 "--out", str(tmp_path / "run"), "--batch-size", "4", "--workers", "0",
                 "--unlocked-text-layers", "0", "--epochs", "1", "--image-views", "2"]) == 0
    assert (tmp_path / "run" / "best.safetensors").exists()
