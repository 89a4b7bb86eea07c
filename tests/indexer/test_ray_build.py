"""`index build --engine ray` in Ray's local mode (2 CPUs, no dashboard): the same index as the
single-process build of the same corpus, resumable from its parquet shards; and the
single-process path never imports Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import indexer.build
import indexer.ray_build
from clipdex.main import main
from indexer.build import BuildConfig, build
from indexer.ray_build import ModelSpec, RayConfig, build_on_ray
from retrieval.ann import ondisk
from retrieval.inputs.demo import ensure_demo_corpus
from retrieval.store import layout, open_generation
from tests.conftest import COLOURS, make_image
from tests.indexer.helpers import img2dataset_shard, sample_partitions, write_clip_retrieval

ROOT = Path(__file__).resolve().parents[2]
# small shards and batches: several of each, so shards complete out of order
CONFIG = BuildConfig(workers=0, shard_size=8, batch_size=8)
TINY = ModelSpec("clipdex-tiny", "cpu")


class DriverKilled(Exception):
    pass


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The demo corpus, a webdataset shard beside it, and two files that cannot be decoded."""
    folder = tmp_path_factory.mktemp("demo")
    ensure_demo_corpus(folder)
    img2dataset_shard(folder / "shards" / "00000.tar", 0, ["red", "green", "blue"])
    (folder / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def single(tiny, corpus, tmp_path_factory) -> tuple[Path, indexer.build.Summary]:
    out = tmp_path_factory.mktemp("single") / "idx"
    return out, build([corpus], out, tiny, CONFIG)


@pytest.fixture(scope="module")
def resumed(ray_local, tiny, corpus, tmp_path_factory) -> tuple[Path, int, indexer.build.Summary]:
    """A Ray build whose driver dies once every shard is written (before any generation),
    run again after losing its last image shard: (index, shards written, second summary).
    The first run is the command line's (`--engine ray`, joining the Ray this module started)."""
    out = tmp_path_factory.mktemp("ray") / "idx"

    def killed(*args, **kwargs):
        raise DriverKilled

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(indexer.build, "write_generation", killed)
        with pytest.raises(DriverKilled):
            main(["index", "build", str(corpus), "--out", str(out), "--engine", "ray",
                  "--model", "clipdex-tiny", "--device", "cpu", "--backend", "torch",
                  "--shard-size", str(CONFIG.shard_size), "--batch-size",
                  str(CONFIG.batch_size)])
    assert not (out / "CURRENT").exists()
    [job] = (out / "work").iterdir()
    shards = sorted(job.glob("*.parquet"))
    max(p for p in shards if p.name.startswith("images")).unlink()
    return out, len(shards), build_on_ray([corpus], out, tiny, TINY, CONFIG)


def test_a_resumed_ray_build_encodes_only_the_lost_shard(resumed):
    out, shards, summary = resumed
    assert (summary.shards_encoded, summary.shards_resumed) == (1, shards - 1)
    assert list((out / "work").iterdir()) == []


def test_a_ray_build_equals_the_single_process_build(single, resumed):
    (local, local_summary), (ray_index, _, ray_summary) = single, resumed
    assert (ray_summary.images, ray_summary.texts, ray_summary.skipped) == (
        local_summary.images, local_summary.texts, local_summary.skipped)
    assert local_summary.skipped == {"empty_file": 1, "not_an_image": 1}
    assert (ray_index / "errors.jsonl").read_text() == (local / "errors.jsonl").read_text()
    with open_generation(local) as a, open_generation(ray_index) as b:
        assert a.next_id == b.next_id
        ids = list(range(1, a.next_id))
        assert a.items(ids) == b.items(ids)  # ids, paths, texts, captions, metadata, links
        assert b.manifest["build"]["engine"] == "ray"
        for modality in ("image", "text"):
            kept = [r.id for r in a.items(ids) if r.modality == modality]
            np.testing.assert_allclose(b.vectors(modality, kept), a.vectors(modality, kept),
                                       atol=1e-5)


def test_ray_flags_need_the_ray_engine(tmp_path, capsys):
    assert main(["index", "build", str(tmp_path), "--out", str(tmp_path / "idx"),
                 "--num-encoders", "2"]) == 2
    assert "need --engine ray" in capsys.readouterr().err


def test_ray_flags_make_the_ray_config():
    from clipdex.main import build_parser
    from clipdex.options import config_from

    args = build_parser().parse_args(["index", "build", "p", "--out", "o", "--engine", "ray",
                                      "--ray-address", "auto", "--num-encoders", "3",
                                      "--gpus-per-encoder", "0.5"])
    assert args.engine == "ray"
    assert config_from(args, RayConfig) == RayConfig(ray_address="auto", num_encoders=3,
                                                     gpus_per_encoder=0.5)


def test_the_single_process_build_never_imports_ray(tmp_path):
    make_image(tmp_path / "photos" / "red.png", COLOURS["red"])
    script = (f"import sys\nfrom clipdex.main import main\n"
              f"code = main(['index', 'build', {str(tmp_path / 'photos')!r}, '--out', "
              f"{str(tmp_path / 'idx')!r}, '--model', 'clipdex-tiny', '--device', 'cpu', "
              f"'--backend', 'torch', '--workers', '0'])\n"
              f"print(code, 'ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            timeout=300)
    assert result.stdout.splitlines()[-1] == "0 False", result.stderr[-2000:]
    assert json.loads("\n".join(result.stdout.splitlines()[:-1]))["images"] == 1


def test_an_import_on_ray_fills_the_on_disk_lists_in_tasks_as_this_process_would(
        ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ondisk, "BLOCK_ROWS", 1500)  # three blocks a modality
    monkeypatch.setattr(ondisk, "DISK_PQ_BYTES", (8,))  # 32 codebooks train too long here
    folder = write_clip_retrieval(tmp_path / "e", sample_partitions(32, sizes=(2500, 1500)))
    filled, on_ray = [], indexer.ray_build.fill_on_ray

    def counted(trained, jobs):
        jobs = list(jobs)
        filled.append(len(jobs))
        on_ray(trained, jobs)

    monkeypatch.setattr(indexer.ray_build, "fill_on_ray", counted)
    command = ["index", "build", "--from-embeddings", str(folder), "--model",
               "external:synthetic", "--index-type", "ivfpq-disk"]
    assert main([*command, "--out", str(tmp_path / "here")]) == 0
    assert main([*command, "--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0, \
        capsys.readouterr().err
    assert filled == [3, 3]  # the images' and the captions' blocks went to Ray tasks
    here, ray = (layout.generation_dir(tmp_path / name, "000001") for name in ("here", "ray"))
    for lists in ("images.ivfdata", "texts.ivfdata"):  # the same codes under the same ids
        assert (ray / lists).read_bytes() == (here / lists).read_bytes()
    assert not list(ray.glob("*.block-*")) and not list(ray.glob("*.trained"))
