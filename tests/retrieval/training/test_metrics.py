"""Our Recall@K equals LAION CLIP_benchmark's on the same embeddings."""

import numpy as np
import pytest
import torch

from retrieval.training.metrics import retrieval_metrics, zero_shot_accuracy


def _random_unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_recall_matches_clip_benchmark():
    zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    rng = np.random.default_rng(0)
    images = _random_unit(rng, 60, 16)
    text_to_image = np.repeat(np.arange(60), 5)
    # captions lean towards their image so recall is neither 0 nor 100
    texts = images[text_to_image] * 0.6 + _random_unit(rng, 300, 16)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    ours = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10))

    scores = torch.from_numpy(texts @ images.T)
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(300), torch.from_numpy(text_to_image)] = True
    for k in (1, 5, 10):
        t2i = (zeroshot_retrieval.recall_at_k(scores, positives, k) > 0).float().mean().item()
        i2t = (zeroshot_retrieval.recall_at_k(scores.T, positives.T, k) > 0).float().mean().item()
        assert ours[f"t2i_R@{k}"] == pytest.approx(t2i * 100, abs=1e-4)
        assert ours[f"i2t_R@{k}"] == pytest.approx(i2t * 100, abs=1e-4)
    assert 0 < ours["t2i_R@1"] < 100


def test_ranks_on_a_hand_made_example():
    images = np.eye(3, dtype=np.float32)
    # text 0 -> image 0 (rank 1), text 1 -> image 1 but closest to image 2 (rank 2)
    texts = np.array([[1, 0, 0], [0, 0.6, 0.8], [0, 0, 1]], dtype=np.float32)
    m = retrieval_metrics(images, texts, np.array([0, 1, 2]), ks=(1, 2))
    assert m["t2i_R@1"] == pytest.approx(200 / 3)
    assert m["t2i_R@2"] == 100
    assert m["t2i_mean_rank"] == pytest.approx(4 / 3)
    assert m["t2i_median_rank"] == 1
    # each image's own caption is its best-scoring text (image 1: 0.6 vs 0 and 0)
    assert m["i2t_R@1"] == 100


def test_zero_shot_accuracy():
    classes = np.eye(3, dtype=np.float32)
    images = np.array([[0.9, 0.1, 0], [0.2, 0.1, 0.9], [0.8, 0.3, 0]], dtype=np.float32)
    acc = zero_shot_accuracy(images, classes, np.array([0, 2, 1]), ks=(1, 2))
    assert acc["zeroshot_top1"] == pytest.approx(200 / 3)
    assert acc["zeroshot_top2"] == 100
