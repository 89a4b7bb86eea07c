"""`--backend torch|onnx|auto`: an index built with ONNX Runtime holds the embeddings torch
gives (cosine >= 0.9999 per row), and `clipdex index info` says which backend built it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipdex.main import main
from retrieval.store import open_generation, read_generation_manifest

COSINE = 0.9999


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Exports of models without a checkpoint folder (architectures) land in the user's cache:
    a temporary one here."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "clipdex" / "onnx"


def build(corpus: Path, out: Path, backend: str) -> None:
    assert main(["index", "build", str(corpus), "--out", str(out), "--model", "clipdex-tiny",
                 "--workers", "0", "--backend", backend]) == 0


def vectors(index: Path, modality: str) -> np.ndarray:
    manifest = read_generation_manifest(index)
    with open_generation(index, manifest.model.sha256, manifest.embed_dim) as generation:
        ids, vectors = generation.all_vectors(modality)
        return vectors[np.argsort(ids)]


def test_onnx_and_torch_builds_agree_and_info_records_the_backend(
        colour_corpus, tmp_path, user_cache, capsys):
    build(colour_corpus, tmp_path / "onnx", "onnx")
    build(colour_corpus, tmp_path / "torch", "torch")
    assert len(list(user_cache.iterdir())) == 1  # the tiny model's export
    for modality in ("image", "text"):
        onnx, torch = vectors(tmp_path / "onnx", modality), vectors(tmp_path / "torch", modality)
        assert onnx.shape == torch.shape and len(onnx) > 0
        assert ((onnx * torch).sum(axis=1)).min() >= COSINE  # unit vectors: dot = cosine
    capsys.readouterr()
    for backend in ("onnx", "torch"):
        assert main(["index", "info", str(tmp_path / backend)]) == 0
        assert json.loads(capsys.readouterr().out)["build"]["backend"] == backend


def test_auto_encodes_with_onnx_runtime_on_cpu(colour_corpus, tmp_path, user_cache, capsys):
    out = tmp_path / "auto.npy"
    assert main(["encode", "--model", "clipdex-tiny", "--device", "cpu", "--texts", "a", "b c",
                 "--out", str(out)]) == 0
    assert len(list(user_cache.iterdir())) == 1  # "auto" exported the towers and used them
    torch_out = tmp_path / "torch.npy"
    assert main(["encode", "--model", "clipdex-tiny", "--backend", "torch", "--texts", "a",
                 "b c", "--out", str(torch_out)]) == 0
    assert (np.load(out) * np.load(torch_out)).sum(axis=1).min() >= COSINE


def test_training_has_no_backend_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--manifest", "x.csv", "--out", "run", "--backend", "onnx"])
    assert "unrecognized arguments: --backend" in capsys.readouterr().err


def test_serve_passes_its_backend_to_the_service_settings():
    from clipdex.commands.serve import settings_from
    from clipdex.main import build_parser

    def settings(*flags: str):
        return settings_from(build_parser().parse_args(["serve", "--index", "idx", *flags]))

    assert settings().backend == "auto"
    assert settings("--backend", "torch").backend == "torch"
