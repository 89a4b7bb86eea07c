"""The ONNX Runtime backend: its embeddings equal torch's (cosine >= 0.9999 per row) for the
tiny model and the real default model, its exports are cached by the weights' fingerprint and
written atomically, and its sessions use the cores the process may run on."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.errors import ModelLoadError
from retrieval.models import onnx as onnx_backend
from retrieval.models.inference import encode_image_batch, encode_images, encode_texts
from retrieval.models.loading import load_model, save_model

COSINE = 0.9999  # the stated tolerance: every row, ONNX Runtime vs torch eager
TEXTS = ["a dog", "x", "two people riding bicycles along a river at sunset",
         ("a very long caption about a black cat that runs across the green grass of a park "
          "near a tall old tree while children play football and a man reads a newspaper"),
         "red"]


def with_onnx(clip, cache: Path):
    """The same torch model with ONNX Runtime towers attached (the torch one stays torch)."""
    twin = copy.copy(clip)
    onnx_backend.attach(twin, "onnx", cache)
    assert twin.backend == "onnx" and twin.onnx is not None
    return twin


@pytest.fixture(scope="module")
def tiny_pair(tiny, tmp_path_factory):
    return tiny, with_onnx(tiny, tmp_path_factory.mktemp("onnx-tiny"))


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    """The bundled default model, exported once for this module into a temporary cache
    (5-8 s on 2 busy cores, half of it ONNX Runtime optimising the two graphs)."""
    clip = load_model("default", device="cpu")
    return clip, with_onnx(clip, tmp_path_factory.mktemp("onnx-default"))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def random_pixels(clip, count: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, H, W) uint8 pixels at the model's input size, as the indexer feeds them."""
    _, channels, height, width = clip.onnx.image_session.get_inputs()[0].shape  # batch, 3, H, W
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, channels, height, width), dtype=torch.uint8,
                         generator=generator)


@pytest.mark.parametrize("pair", ["tiny_pair", "default_pair"])
def test_image_embeddings_equal_torch_for_a_batch_and_a_single_image(pair, request):
    torch_clip, onnx_clip = request.getfixturevalue(pair)
    for count in (5, 1):
        pixels = random_pixels(onnx_clip, count, seed=count)
        expected = encode_image_batch(torch_clip, pixels)
        got = encode_image_batch(onnx_clip, pixels)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert row_cosines(got, expected).min() >= COSINE


@pytest.mark.parametrize("pair", ["tiny_pair", "default_pair"])
def test_text_embeddings_equal_torch_at_every_length_batched_and_single(pair, request):
    torch_clip, onnx_clip = request.getfixturevalue(pair)
    for batch_size in (len(TEXTS), 2, 1):
        expected = encode_texts(torch_clip, TEXTS, batch_size=batch_size)
        got = encode_texts(onnx_clip, TEXTS, batch_size=batch_size)
        assert row_cosines(got, expected).min() >= COSINE
    assert row_cosines(encode_texts(onnx_clip, TEXTS[:1]),
                       encode_texts(torch_clip, TEXTS[:1])).min() >= COSINE


@pytest.mark.parametrize("pair", ["tiny_pair", "default_pair"])
def test_the_text_graphs_run_at_the_real_length(pair, request):
    _, onnx_clip = request.getfixturevalue(pair)
    assert onnx_clip.onnx.dynamic_length
    length_axis = onnx_clip.onnx.text_session.get_inputs()[0].shape[1]
    assert isinstance(length_axis, str)  # a named dynamic axis, not the context length


def test_image_files_through_the_onnx_backend_equal_torch(tiny_pair, colour_corpus):
    torch_clip, onnx_clip = tiny_pair
    paths = sorted((colour_corpus.parent / "img").glob("*.png"))
    assert row_cosines(encode_images(onnx_clip, paths, batch_size=3),
                       encode_images(torch_clip, paths)).min() >= COSINE


def test_reduced_precision_runs_torch_even_on_the_onnx_backend(tiny_pair):
    torch_clip, onnx_clip = tiny_pair
    pixels = random_pixels(onnx_clip, 2)
    bf16 = encode_image_batch(onnx_clip, pixels, precision="bf16")
    assert np.array_equal(bf16, encode_image_batch(torch_clip, pixels, precision="bf16"))


def test_sessions_use_the_cores_the_process_may_run_on():
    import onnxruntime as ort

    options = onnx_backend.session_options()
    assert options.intra_op_num_threads == len(os.sched_getaffinity(0))
    assert options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_auto_picks_onnx_on_cpu_and_torch_on_cuda():
    assert onnx_backend.choose("auto", torch.device("cpu")) == "onnx"
    assert onnx_backend.choose("auto", torch.device("cuda")) == "torch"
    assert onnx_backend.choose("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ModelLoadError, match="runs on CPU"):
        onnx_backend.choose("onnx", torch.device("cuda"))
    with pytest.raises(ModelLoadError, match="backend must be one of"):
        onnx_backend.choose("tensorrt", torch.device("cpu"))


def tiny_checkpoint(tiny, path: Path, nudge: float = 0.0) -> Path:
    """The tiny model saved as a clipdex checkpoint; `nudge` changes its weights."""
    clip = copy.copy(tiny)
    clip.model = copy.deepcopy(tiny.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in (clip.model.text_projection, clip.model.visual.proj):
            weight.add_(nudge * torch.randn(weight.shape, generator=generator))
    save_model(clip, path)
    return path


def test_the_export_sits_beside_the_checkpoint_is_reused_and_redone_when_it_changes(
        tiny, tmp_path):
    checkpoint = tiny_checkpoint(tiny, tmp_path / "model.safetensors")
    first = load_model(str(checkpoint), device="cpu", backend="onnx")
    folder = first.onnx.folder
    assert first.onnx.exported and folder.parent == tmp_path / "model.onnx"
    stamps = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    again = load_model(str(checkpoint), device="cpu", backend="onnx")
    assert not again.onnx.exported and again.onnx.folder == folder
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == stamps

    tiny_checkpoint(tiny, checkpoint, nudge=0.5)  # new weights under the same name
    changed = load_model(str(checkpoint), device="cpu", backend="onnx")
    assert changed.onnx.exported and changed.onnx.folder != folder
    assert [p.name for p in (tmp_path / "model.onnx").iterdir()] == [changed.onnx.folder.name]
    texts = ["a red square", "a cat"]
    assert row_cosines(encode_texts(changed, texts),
                       encode_texts(load_model(str(checkpoint), device="cpu"), texts)
                       ).min() >= COSINE
    assert row_cosines(encode_texts(changed, texts), encode_texts(first, texts)).min() < COSINE


def test_a_model_whose_folder_is_not_writable_exports_into_the_user_cache(
        tiny, tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tiny, tmp_path / "shipped" / "model.safetensors")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_backend, "_writable", lambda folder: False)  # a read-only wheel
    clip = load_model(str(checkpoint), device="cpu", backend="onnx")
    assert clip.onnx.folder.parent == tmp_path / "cache" / "clipdex" / "onnx"
    assert not (tmp_path / "shipped" / "model.onnx").exists()


def test_a_killed_export_leaves_no_half_folder_and_the_next_load_exports(
        tiny, tmp_path, monkeypatch):
    real = onnx_backend._export_into

    def killed(clip, folder, fingerprint):
        (folder / onnx_backend.IMAGE_FILE).write_bytes(b"half an onnx file")
        raise KeyboardInterrupt  # what a Ctrl-C in the middle of the export raises

    monkeypatch.setattr(onnx_backend, "_export_into", killed)
    with pytest.raises(KeyboardInterrupt):
        load_model("clipdex-tiny", device="cpu", backend="onnx", onnx_cache=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(onnx_backend, "_export_into", real)
    clip = load_model("clipdex-tiny", device="cpu", backend="onnx", onnx_cache=tmp_path)
    assert clip.onnx.exported and [p.name for p in tmp_path.iterdir()] == [clip.onnx.folder.name]


def test_auto_falls_back_to_torch_when_the_export_fails_and_onnx_says_why(
        tiny, tmp_path, monkeypatch):
    def unsupported(clip, folder, fingerprint):
        raise ModelLoadError("cannot export image tower to ONNX: unsupported operator")

    monkeypatch.setattr(onnx_backend, "_export_into", unsupported)
    clip = load_model("clipdex-tiny", device="cpu", backend="auto", onnx_cache=tmp_path)
    assert clip.backend == "torch" and clip.onnx is None
    with pytest.raises(ModelLoadError, match="unsupported operator"):
        load_model("clipdex-tiny", device="cpu", backend="onnx", onnx_cache=tmp_path)


def test_a_model_on_onnx_runtime_is_refused_for_training(tiny_pair):
    from retrieval.training.config import TrainConfig
    from retrieval.training.train import prepare_model

    _, onnx_clip = tiny_pair
    with pytest.raises(ModelLoadError, match="backend='torch'"):
        prepare_model(onnx_clip, TrainConfig(out=Path("unused")))


def test_a_model_on_onnx_runtime_can_be_sent_to_another_process(tiny_pair):
    """What a worker pool or an actor receives: sessions reopened from the same files."""
    import pickle

    _, onnx_clip = tiny_pair
    copied = pickle.loads(pickle.dumps(onnx_clip.onnx))
    assert copied.folder == onnx_clip.onnx.folder and copied is not onnx_clip.onnx
    tokens = onnx_clip.tokenizer(["a red square", "a cat"])
    np.testing.assert_array_equal(copied.text(tokens), onnx_clip.onnx.text(tokens))
