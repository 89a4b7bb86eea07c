"""The demo corpus: captions in the repository, photographs from the scikit-image wheel."""

import shutil

from retrieval.inputs.demo import DEMO_CAPTIONS, demo_corpus
from retrieval.training.evaluate import rank_images


def test_a_fresh_copy_gets_its_photographs_from_scikit_image(tmp_path):
    shutil.copyfile(DEMO_CAPTIONS, tmp_path / "captions.csv")
    corpus = demo_corpus(tmp_path)
    assert len(corpus.items) == 22 and corpus.problems == []
    assert all(item.image.parent == tmp_path for item in corpus.items)


def test_rank_images_orders_by_score(tiny, tmp_path):
    shutil.copyfile(DEMO_CAPTIONS, tmp_path / "captions.csv")
    ranked = rank_images(tiny, demo_corpus(tmp_path), "a cat", k=5)
    scores = [score for score, _ in ranked]
    assert len(ranked) == 5 and scores == sorted(scores, reverse=True)
