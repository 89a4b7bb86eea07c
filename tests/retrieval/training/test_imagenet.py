"""The ImageNet pseudo-label term: the tower's own classifier as teacher, class prompts as
targets, and `clipdex train --imagenet-weight` end to end."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from clipdex.main import main
from retrieval.training.imagenet import (
    ImageNetTargets,
    class_names,
    classifier_of,
    prepare_targets,
    teacher_probs,
)
from retrieval.training.loss import soft_target_loss
from retrieval.training.towers import split_image_tower, split_text_tower


def test_class_names_are_the_thousand_imagenet_classes_in_order():
    names = class_names()
    assert len(names) == 1000
    assert (names[0], names[285], names[968]) == ("tench", "Egyptian cat", "cup")


def test_soft_target_loss_with_one_hot_targets_is_cross_entropy():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(4, 8), dim=-1)
    classes = F.normalize(torch.randn(6, 8), dim=-1)
    labels = torch.tensor([0, 3, 5, 1])
    scale = torch.tensor(2.0)
    expected = F.cross_entropy(scale.exp() * images @ classes.T, labels)
    got = soft_target_loss(images, classes, scale, F.one_hot(labels, 6).float())
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("unlocked", [0, 1])
def test_teacher_on_cached_features_is_the_towers_own_classifier(towers, unlocked):
    """The cat photograph is a cat to the teacher, from pooled or feature-map caches."""
    pixels = towers.preprocess(Image.fromarray(data.chelsea()))[None]
    split = split_image_tower(towers, unlocked)
    with torch.no_grad():
        cached = split.frozen(pixels)
    probs = teacher_probs(towers, split, cached, classifier_of(towers))
    assert probs.shape == (1, 1000)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1))
    assert class_names()[int(probs.argmax())] in ("Egyptian cat", "tabby", "tiger cat")


def test_sampled_classes_hold_each_rows_top_class_once():
    probs = torch.zeros(3, 1000)
    probs[0, 7] = probs[1, 7] = probs[2, 42] = 1.0
    targets = ImageNetTargets(probs, prompt_hidden=[], classes_per_step=16)
    chosen = targets.sample([0, 1, 2], random.Random(0))
    assert chosen[:2] == [7, 42] and len(chosen) == len(set(chosen)) == 16


def test_the_term_pulls_images_towards_their_teacher_class(towers):
    targets = prepare_targets(towers, split_image_tower(towers, 0), split_text_tower(towers, 1),
                              torch.zeros(2, 1280), classes_per_step=8)
    assert len(targets.prompt_hidden) == 1000
    targets.probs = torch.zeros(2, 1000)
    targets.probs[0, 285] = targets.probs[1, 968] = 1.0  # a cat, a cup
    text = split_text_tower(towers, 1)
    cat_and_cup = F.normalize(text.trainable(*_stack(targets, [285, 968])), dim=-1).detach()
    aligned = targets.loss(towers, text, [0, 1], cat_and_cup, random.Random(0))
    swapped = targets.loss(towers, text, [0, 1], cat_and_cup.flip(0), random.Random(0))
    assert aligned.item() < swapped.item()


def _stack(targets, classes):
    from retrieval.training.features import pad_hidden

    return pad_hidden([targets.prompt_hidden[c] for c in classes], torch.device("cpu"))


def test_train_with_the_imagenet_term_logs_it(colour_corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--manifest", str(colour_corpus), "--model", "clipdex-effnet-minilm",
                 "--out", str(out), "--batch-size", "4", "--unlocked-text-layers", "1",
                 "--workers", "0", "--epochs", "1", "--imagenet-weight", "0.5",
                 "--imagenet-classes", "16"]) == 0
    with open(out / "log.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert np.isfinite(float(row["imagenet_loss"])) and float(row["imagenet_loss"]) > 0


def test_the_term_is_refused_for_towers_without_an_imagenet_head(colour_corpus, tmp_path,
                                                                 capsys):
    assert main(["train", "--manifest", str(colour_corpus), "--model", "clipdex-tiny",
                 "--out", str(tmp_path / "run"), "--batch-size", "4", "--workers", "0",
                 "--epochs", "1", "--imagenet-weight", "0.5"]) == 2
    assert "ImageNet term needs" in capsys.readouterr().err
