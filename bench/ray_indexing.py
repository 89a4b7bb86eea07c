"""Ray local mode against the single-process indexer: images/s of `index build` on the same
corpus, in one run (goal: Ray ÷ single-process >= 0.8 on 2 cores).

    .venv/bin/python bench/ray_indexing.py --model default --repeat 10 [--backend torch]

The single-process build runs before and after the Ray build, and the ratio is taken over
their mean (the machine's load drifts); a small build first warms each up (ONNX Runtime
sessions, the page cache; Ray's task workers import the libraries once, as on a cluster
already running). Ray's encoder actors run the same backend as the driver's model. The
corpus is `--repeat` copies of the demo photographs (distinct files, no captions, so only
images are encoded). Ray is started once before the timed builds; its start-up is
reported apart.

Every Ray build starts its encoder actors, and each loads the model in a new process (about
6 s on 2 cores: importing torch and open_clip, then the model), which the single-process
build, whose workers fork from a process that has the model, never pays. The small warm-up
build is mostly that cost (`ray_small_build_s`); `ray_steady_images_per_s` is the rate
past it, (N - 22) / (big build - small build).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from indexer.build import BuildConfig, build
from indexer.ray_build import ModelSpec, RayConfig, build_on_ray
from retrieval.inputs.demo import DEMO_DIR, ensure_demo_corpus
from retrieval.models.loading import load_model


def make_corpus(folder: Path, repeat: int) -> int:
    ensure_demo_corpus()
    images = sorted(p for p in DEMO_DIR.iterdir() if p.suffix in (".png", ".jpg"))
    for copy in range(repeat):
        for image in images:
            target = folder / str(copy) / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
    return len(images) * repeat


def _single_process(corpus: Path, out: Path, clip: object, config: BuildConfig) -> float:
    """images/s of one single-process build of `corpus`."""
    started = time.perf_counter()
    summary = build([corpus], out, clip, config)
    return summary.images / (time.perf_counter() - started)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"),
                        help="as `index build --backend` (auto: ONNX Runtime on CPU)")
    parser.add_argument("--repeat", type=int, default=10, help="copies of the 22 demo images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Ray's CPUs")
    parser.add_argument("--cpus-per-encoder", type=float, default=1.0)
    args = parser.parse_args()
    clip = load_model(args.model, "cpu", backend=args.backend)
    config = BuildConfig(batch_size=args.batch_size, shard_size=256)
    with tempfile.TemporaryDirectory() as temp:
        corpus = Path(temp) / "corpus"
        count = make_corpus(corpus, args.repeat)
        _single_process(corpus / "0", Path(temp) / "warm", clip, config)  # sessions, caches
        before = _single_process(corpus, Path(temp) / "before", clip, config)
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - started
        spec = ModelSpec(args.model, "cpu", clip.backend)  # the towers the other side runs
        ray_config = RayConfig(cpus_per_encoder=args.cpus_per_encoder)
        started = time.perf_counter()
        small = build_on_ray([corpus / "0"], Path(temp) / "ray-warm", clip, spec, config,
                             ray_config)
        small_s = time.perf_counter() - started
        started = time.perf_counter()
        on_ray = build_on_ray([corpus], Path(temp) / "ray", clip, spec, config, ray_config)
        big_s = time.perf_counter() - started
        ray_rate = on_ray.images / big_s
        ray.shutdown()
        after = _single_process(corpus, Path(temp) / "after", clip, config)
    local_rate = (before + after) / 2  # one run each side of Ray's: a shared box drifts
    print(json.dumps({"images": count, "model": args.model, "backend": clip.backend,
                      "cpus": args.cpus,
                      "load_average": [round(x, 2) for x in os.getloadavg()],
                      "single_process_images_per_s": [round(before, 2), round(after, 2)],
                      "ray_images_per_s": round(ray_rate, 2),
                      "ratio": round(ray_rate / local_rate, 3),
                      "ray_start_seconds": round(ray_start, 1),
                      "ray_small_build_s": round(small_s, 1), "ray_small_images": small.images,
                      "ray_steady_images_per_s": round(
                          (on_ray.images - small.images) / max(big_s - small_s, 1e-9), 2)},
                     indent=2))


if __name__ == "__main__":
    main()
