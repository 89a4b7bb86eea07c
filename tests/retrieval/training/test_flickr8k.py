"""The bundled default model on real data: a slice of the Flickr8k test split."""

import pytest

from retrieval.inputs.captions import read_manifest, read_split
from retrieval.models.loading import load_model
from retrieval.training.evaluate import evaluate
from tests.conftest import FLICKR8K

pytestmark = pytest.mark.skipif(not FLICKR8K.exists(),
                                reason=f"{FLICKR8K} is absent (research-only data, not shipped)")


def test_default_model_retrieves_on_100_test_images():
    names = sorted(read_split(FLICKR8K / "splits" / "test.txt"))[:100]
    manifest = read_manifest(FLICKR8K / "captions.csv", image_root=FLICKR8K / "images",
                             split=set(names))
    results, problems = evaluate(load_model("default", device="cpu"), manifest, workers=0)
    assert problems == [] and results["images"] == 100 and results["texts"] == 500
    # chance is 10 % at R@10 among 100 images; the full 1k-test figures are in the README
    assert results["t2i_R@10"] > 60 and results["i2t_R@10"] > 60
