"""Decoding workers ship uint8 pixels and the encoder normalises the batch: the embeddings
are the ones the float path gives, bit for bit; the workers yield the CPU to the encoder."""

from __future__ import annotations

import os

import numpy as np
import torch

from retrieval.inputs.tensors import _tensor_steps, split_tensor_tail
from retrieval.models.files import encode_image_files, iter_image_batches
from retrieval.models.inference import encode_image_batch
from tests.conftest import COLOURS, make_image


def test_uint8_batches_are_the_float_batches_within_a_rounding(tiny, tmp_path):
    """The uint8 path resizes on tensors (torchvision's vectorised uint8 kernels) where the
    model's own preprocess resizes with Pillow: the pixels may differ by one level of 255,
    and the embeddings by no more than a cosine of 0.9999."""
    paths = [make_image(tmp_path / f"{name}.png", colour, size=(300, 180))
             for name, colour in COLOURS.items()]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(3, tmp_path / "bad.png")
    floats = list(iter_image_batches(paths, tiny.preprocess, batch_size=4, workers=0))
    raws = list(iter_image_batches(paths, tiny.preprocess, batch_size=4, workers=0,
                                   uint8=True))
    assert [b.indices for b in raws] == [b.indices for b in floats]
    assert [len(b.problems) for b in raws] == [len(b.problems) for b in floats] == [1, 0, 0]
    assert _tensor_steps(tiny.preprocess.transforms[:-2]) is not None  # the fast path ran
    _, mean, std = split_tensor_tail(tiny.preprocess)
    for raw, float_batch in zip(raws, floats):
        assert raw.pixels.dtype == torch.uint8 and float_batch.pixels.dtype == torch.float32
        levels = float_batch.pixels * torch.tensor(std).view(1, 3, 1, 1) * 255 \
            + torch.tensor(mean).view(1, 3, 1, 1) * 255
        assert (raw.pixels.float() - levels).abs().max() <= 1.01
        cosine = (encode_image_batch(tiny, raw.pixels)
                  * encode_image_batch(tiny, float_batch.pixels)).sum(axis=1)
        assert cosine.min() >= 0.9999
    embeddings, kept, problems = encode_image_files(tiny, paths, batch_size=4, workers=0)
    assert kept.tolist() == [0, 1, 2, 4, 5, 6, 7, 8] and len(problems) == 1
    np.testing.assert_array_equal(embeddings, np.concatenate(
        [encode_image_batch(tiny, b.pixels) for b in raws]))


def test_a_preprocess_with_steps_torchvision_cannot_run_on_tensors_stays_on_pillow(tiny):
    from PIL import Image
    from torchvision import transforms

    steps = tiny.preprocess.transforms
    odd = transforms.Compose([transforms.Grayscale(3), *steps])  # no tensor twin here
    to_uint8, _, _ = split_tensor_tail(odd)
    image = Image.new("RGB", (90, 60), (200, 30, 30))
    grey = to_uint8(image)
    assert grey.dtype == torch.uint8 and bool((grey[0] == grey[1]).all())
    assert not bool((grey[0] == 200).all())  # Pillow's greyscale ran, not a tensor copy


def test_a_preprocess_of_another_shape_keeps_the_float_path(tiny, tmp_path):
    def preprocess(image):  # not a Compose: nothing to split
        return tiny.preprocess(image)

    assert split_tensor_tail(preprocess) is None
    path = make_image(tmp_path / "red.png", COLOURS["red"])
    (batch,) = iter_image_batches([path], preprocess, workers=0, uint8=True)
    assert batch.pixels.dtype == torch.float32


def test_decode_workers_step_back_from_the_encoder_and_the_caller_keeps_its_priority(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    for path in paths:
        make_image(path, (1, 2, 3))
    own = os.nice(0)
    niceness = [int(value) for batch in iter_image_batches(
        paths, lambda _image: torch.tensor([os.nice(0)]), batch_size=2, workers=2, nice=3)
        for value in batch.pixels]
    assert niceness == [min(own + 3, 19)] * 4 and os.nice(0) == own
