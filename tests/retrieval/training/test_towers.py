"""The cached split forward equals the model's own forward, so caching changes nothing."""

import pytest
import torch

from retrieval.models.text import trim_padding
from retrieval.training.towers import split_image_tower, split_text_tower


def test_text_split_equals_full_forward_at_every_cut(towers):
    tokens = trim_padding(towers.tokenizer(["a dog runs", "kids play near a red boat"]),
                          towers.pad_token_id)
    with torch.no_grad():
        reference = towers.model.encode_text(tokens)
        for unlocked in (0, 1, 3, 6):
            split = split_text_tower(towers, unlocked)
            hidden, mask = split.frozen(tokens)
            torch.testing.assert_close(split.trainable(hidden, mask), reference,
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unlocked, shape", [(0, (2, 1280)), (1, (2, 192, 7, 7)),
                                             (2, (2, 112, 14, 14))])
def test_image_split_equals_full_forward(towers, unlocked, shape):
    pixels = torch.randn(2, 3, 224, 224)
    split = split_image_tower(towers, unlocked)
    with torch.no_grad():
        features = split.frozen(pixels)
        assert features.shape == shape
        torch.testing.assert_close(split.trainable(features), towers.model.encode_image(pixels),
                                   atol=1e-5, rtol=1e-5)


def test_native_towers_have_no_split(tiny):
    assert split_image_tower(tiny) is None
    assert split_text_tower(tiny, 1) is None
