import numpy as np
import pytest
from PIL import Image

from retrieval.models.inference import encode_image_batch, encode_images, encode_texts
from retrieval.models.text import trim_padding

QUERIES = ["a dog", "two children play football on a green field next to a red house",
           "cat", "a man riding a bicycle down a busy city street at night in the rain"]


@pytest.mark.parametrize("fixture", ["tiny", "towers"])
def test_trimmed_text_embeddings_equal_padded(fixture, request):
    clip = request.getfixturevalue(fixture)
    trimmed = encode_texts(clip, QUERIES, trim=True)
    padded = encode_texts(clip, QUERIES, trim=False)
    assert trimmed.shape == (4, clip.embed_dim)
    np.testing.assert_allclose(trimmed, padded, atol=1e-5)


def test_trim_padding_cuts_to_longest_real_sequence(towers):
    tokens = towers.tokenizer(["a dog", "a dog on a beach"])
    trimmed = trim_padding(tokens, towers.pad_token_id)
    assert tokens.shape[1] == 64
    # [CLS] a dog on a beach [SEP] = 7 tokens
    assert trimmed.shape == (2, 7)


def test_embeddings_are_unit_norm_float32_for_any_batch_size(tiny):
    texts = [f"text number {i}" for i in range(7)]
    whole = encode_texts(tiny, texts, batch_size=256)
    assert whole.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    for batch_size in (1, 3):
        np.testing.assert_allclose(encode_texts(tiny, texts, batch_size=batch_size), whole,
                                   atol=1e-5)
    assert encode_texts(tiny, []).shape == (0, tiny.embed_dim)


def test_images_from_paths_and_pil_agree(tiny, tmp_path):
    image = Image.new("RGB", (50, 30), (120, 30, 200))
    image.save(tmp_path / "x.png")
    from_path = encode_images(tiny, [tmp_path / "x.png", image], batch_size=1)
    np.testing.assert_allclose(from_path[0], from_path[1], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(from_path, axis=1), 1.0, atol=1e-5)


def test_bf16_autocast_on_cpu_is_close_to_fp32(tiny):
    """The half-precision code path runs on CPU too (bf16), so it is tested without a GPU."""
    full = encode_texts(tiny, QUERIES, precision="fp32")
    half = encode_texts(tiny, QUERIES, precision="bf16")
    assert half.dtype == np.float32
    assert np.min(np.sum(full * half, axis=1)) > 0.99


def test_convnet_image_tower_runs_channels_last_with_unchanged_values(towers):
    """load_model puts convnet towers in NHWC (faster on CPU); embeddings must not change."""
    import copy

    import torch

    assert towers.model.visual.trunk.conv_stem.weight.is_contiguous(
        memory_format=torch.channels_last)
    pixels = torch.randn(2, 3, 224, 224)
    reference = copy.deepcopy(towers.model.visual).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference(pixels), dim=-1).numpy()
    np.testing.assert_allclose(encode_image_batch(towers, pixels), expected, atol=1e-5)
