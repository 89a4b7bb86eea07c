"""The `clipdex` command line, called the way a user would."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clipdex.main import main


def test_help_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "clipdex", "--help"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0
    for command in ("train", "eval", "encode", "demo"):
        assert command in result.stdout


def test_eval_prints_recall_and_zero_shot_accuracy(colour_corpus, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--manifest", str(colour_corpus), "--model", "clipdex-tiny",
                 "--workers", "0", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["images"] == 8 and results["texts"] == 16
    for key in ("t2i_R@1", "i2t_R@10", "t2i_median_rank", "zeroshot_top1"):
        assert key in results
    assert results["t2i_R@10"] == 100.0  # only 8 images: every text hits within 10


def test_encode_writes_normalised_npy(tmp_path):
    out = tmp_path / "e.npy"
    assert main(["encode", "--model", "clipdex-tiny", "--texts", "a", "b c", "--out",
                 str(out)]) == 0
    embeddings = np.load(out)
    assert embeddings.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)


def test_errors_are_one_line_messages_with_exit_code_2(tmp_path, capsys):
    assert main(["eval", "--manifest", str(tmp_path / "missing.csv"), "--model",
                 "clipdex-tiny"]) == 2
    assert "missing.csv does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command, expected", [
    (["serve", "--help"], "PASSIVE"), (["index", "--help"], None)])
def test_the_service_lets_idle_openmp_threads_sleep_before_faiss_loads(command, expected):
    """Spinning OpenMP threads take the cores a service needs between requests; the policy is
    read once, when faiss loads its runtime, so it must be in the environment before that."""
    probe = ("import os, sys; sys.argv = ['clipdex', *sys.argv[1:]]; import clipdex.main; "
             "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", probe, *command], env=env, text=True,
                            capture_output=True, check=True)
    assert result.stdout.strip() == str(expected)
