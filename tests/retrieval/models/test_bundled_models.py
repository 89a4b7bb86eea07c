"""The two models shipped in retrieval/models/bundled/: `default` (EfficientNet-Lite2 + MiniLM) and `fast` (the
earlier EfficientNet-Lite0 default), on the demo corpus and against each other's indexes."""

from __future__ import annotations

import csv

import pytest

from indexer.build import BuildConfig, build
from retrieval.errors import IndexMismatchError
from retrieval.inputs.demo import demo_corpus
from retrieval.models.identity import model_fingerprint
from retrieval.models.loading import BUNDLED, load_model
from retrieval.store import open_generation
from retrieval.training.evaluate import rank_images


def test_both_models_ship_with_the_package():
    assert all(path.is_file() for path in BUNDLED.values()), BUNDLED


@pytest.fixture(scope="module")
def default():
    return load_model("default", device="cpu")


@pytest.fixture(scope="module")
def fast():
    return load_model("fast", device="cpu")


def test_the_default_is_the_lite2_model_and_fast_the_lite0_one(default, fast):
    assert default.arch == "clipdex-effnet2-minilm" and fast.arch == "clipdex-effnet-minilm"
    assert default.card["bundled_as"] == "default" and fast.card["bundled_as"] == "fast"


@pytest.mark.parametrize("query, first", [("a cat", "chelsea.png"),
                                          ("a rocket launch", "rocket.jpg")])
def test_the_demo_queries_rank_the_right_photograph_first(default, query, first):
    ranked = rank_images(default, demo_corpus(), query, k=1)
    assert ranked[0][1].image.name == first


def test_an_index_built_with_the_old_default_refuses_the_new_one(default, fast, tmp_path):
    """Generations built before December 2026 name the Lite0 model, now bundled as `fast`."""
    corpus = demo_corpus()
    manifest = tmp_path / "two.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows([str(item.image), item.captions[0]] for item in corpus.items[:2])
    build([manifest], tmp_path / "idx", fast, BuildConfig(workers=0))
    with open_generation(tmp_path / "idx", model_fingerprint(fast), fast.embed_dim):
        pass  # the model it was built with still opens it
    with pytest.raises(IndexMismatchError, match="clipdex-effnet-minilm"):
        open_generation(tmp_path / "idx", model_fingerprint(default), default.embed_dim)
