"""Models users bring: open_clip `hf-hub:` specs (from the hub cache, offline), local open_clip
model folders and weights files; an index built with one refuses queries from another."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants as hub_constants
import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clipdex.main import main
from retrieval import ModelEncoder, Searcher
from retrieval.errors import IndexMismatchError, ModelLoadError
from retrieval.models.identity import model_fingerprint
from retrieval.models.inference import encode_texts
from retrieval.models.loading import load_model, read_architecture
from retrieval.store import open_generation
from tests.conftest import COLOURS, make_image

REPO = "clipdex-test/tiny-clip"


def write_open_clip_folder(folder: Path, seed: int) -> Path:
    """A tiny random open_clip model as the hub stores one: config JSON + safetensors."""
    config = read_architecture("clipdex-tiny")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": config["model_cfg"], "preprocess_cfg": config["preprocess_cfg"]}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A hub cache holding REPO at one snapshot (refs/main names it), the hub offline."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_open_clip_folder(repo / "snapshots" / commit, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / commit


def test_hf_hub_spec_loads_offline_from_the_cache(hub_cache):
    clip = load_model(f"hf-hub:{REPO}", device="cpu")
    assert clip.arch == f"hf-hub:{REPO}" and clip.embed_dim == 32
    assert clip.init == f"openclip:hf-hub:{REPO}"
    torch.manual_seed(1)  # the seed write_open_clip_folder used for the cached snapshot
    reference = open_clip.CLIP(**read_architecture("clipdex-tiny")["model_cfg"])
    torch.testing.assert_close(clip.model.state_dict()["text_projection"],
                               reference.state_dict()["text_projection"])
    assert encode_texts(clip, ["a red square"]).shape == (1, 32)


def test_an_hf_hub_spec_missing_from_the_cache_names_the_offline_options(hub_cache):
    with pytest.raises(ModelLoadError, match="Offline options"):
        load_model("hf-hub:clipdex-test/not-cached", device="cpu")


def test_local_folder_and_weights_file_load_the_same_model(tmp_path):
    folder = write_open_clip_folder(tmp_path / "model", seed=2)
    from_folder = load_model(str(folder), device="cpu")
    from_file = load_model(str(folder / "open_clip_model.safetensors"), device="cpu")
    texts = ["a red square", "a blue square"]
    np.testing.assert_allclose(encode_texts(from_folder, texts), encode_texts(from_file, texts),
                               atol=1e-6)
    assert from_folder.arch == f"local-dir:{folder.resolve()}"


def test_a_folder_without_open_clip_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        load_model(str(tmp_path / "empty"), device="cpu")


def test_index_and_search_with_a_hub_model_then_refuse_another(hub_cache, tmp_path, capsys):
    photos = tmp_path / "photos"
    for name in ("red", "green", "blue"):
        make_image(photos / f"{name}.png", COLOURS[name])
        (photos / f"{name}.txt").write_text(f"a {name} square\n")
    out = tmp_path / "idx"
    spec = f"hf-hub:{REPO}"
    assert main(["index", "build", str(photos), "--out", str(out), "--model", spec,
                 "--device", "cpu", "--workers", "0"]) == 0
    capsys.readouterr()
    clip = load_model(spec, device="cpu")
    with open_generation(out, model_fingerprint(clip), clip.embed_dim) as generation:
        query = encode_texts(clip, ["a green square"])
        _scores, ids = generation.search("text", query, 1)
        assert generation.items([int(ids[0, 0])])[0].text == "a green square"
        assert generation.search("image", query, 3)[1].shape == (1, 3)
    other = load_model(str(write_open_clip_folder(tmp_path / "other", seed=3)), device="cpu")
    with pytest.raises(IndexMismatchError, match="hf-hub:clipdex-test/tiny-clip"):
        open_generation(out, model_fingerprint(other), other.embed_dim)
    with open_generation(out) as generation, pytest.raises(IndexMismatchError, match="rebuild"):
        Searcher(generation, ModelEncoder(other))  # opened without a model: the Searcher checks
    assert main(["search", "--index", str(out), "a green square", "--model", spec,
                 "--target", "text"]) == 0
    assert "a green square" in capsys.readouterr().out.splitlines()[0]
    other_folder = str(tmp_path / "other")
    assert main(["search", "--index", str(out), "a green square", "--model", other_folder]) != 0
    assert "rebuild the index" in capsys.readouterr().err
