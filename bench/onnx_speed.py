"""ONNX Runtime ÷ torch eager on CPU: images/s and texts/s of the same model, same weights, at
batch 1, 8 and 32, and the lowest cosine between the two backends' embeddings.

    .venv/bin/python bench/onnx_speed.py --models default,ViT-B-32

Images are uint8 pixels at the model's input size (what the indexer feeds), texts short search
queries (what the service gets). Each rate is the best of `--repeats` timed calls after a
warm-up; the ratio is of two rates measured in the same run, so it holds on a shared, noisy
machine where the absolute figures do not. ViT-B-32 has random weights (no network here):
its speed is that of the trained model. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.models import onnx as onnx_backend
from retrieval.models.inference import encode_image_batch, encode_texts
from retrieval.models.loading import load_model

QUERIES = ["a dog", "red car", "a cat on a sofa", "two people hiking", "sunset over the sea",
           "a child with a ball", "city street at night", "coffee",
           "a brown dog running on the beach at sunset"]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _rates(torch_clip, onnx_clip, call, items: int, repeats: int) -> dict:
    """Best of `repeats` timed calls per backend after a warm-up of each, the two backends
    taking turns, so that both see the same background load on a shared machine."""
    call(torch_clip), call(onnx_clip)  # warm-up: allocators, kernels, first-run planning
    eager = ort = float("inf")
    for _ in range(repeats):
        eager = min(eager, _timed(lambda: call(torch_clip)))
        ort = min(ort, _timed(lambda: call(onnx_clip)))
    return {"torch_per_s": round(items / eager, 1), "onnx_per_s": round(items / ort, 1),
            "ratio": round(eager / ort, 2)}


def _lowest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(axis=1)).min())  # both unit rows


def measure(spec: str, batches: list[int], repeats: int, cache: Path) -> dict:
    torch_clip = load_model(spec, "cpu")
    onnx_clip = copy.copy(torch_clip)
    started = time.perf_counter()
    onnx_backend.attach(onnx_clip, "onnx", cache)
    export_s = time.perf_counter() - started
    _, channels, height, width = onnx_clip.onnx.image_session.get_inputs()[0].shape
    generator = torch.Generator().manual_seed(0)
    out = {"export_and_load_s": round(export_s, 1), "image_size": [height, width],
           "text_length": "real" if onnx_clip.onnx.dynamic_length else "full context",
           "images": {}, "texts": {}}
    cosines = []
    for batch in batches:
        pixels = torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8,
                               generator=generator)
        texts = [QUERIES[i % len(QUERIES)] for i in range(batch)]
        out["images"][str(batch)] = _rates(torch_clip, onnx_clip,
                                           lambda clip, x=pixels: encode_image_batch(clip, x),
                                           batch, repeats)
        out["texts"][str(batch)] = _rates(
            torch_clip, onnx_clip,
            lambda clip, t=texts: encode_texts(clip, t, batch_size=len(t)),
            batch, repeats)
        cosines += [_lowest_cosine(encode_image_batch(torch_clip, pixels),
                                   encode_image_batch(onnx_clip, pixels)),
                    _lowest_cosine(encode_texts(torch_clip, texts), encode_texts(onnx_clip, texts))]
        print(spec, batch, json.dumps(out["images"][str(batch)]),
              json.dumps(out["texts"][str(batch)]), file=sys.stderr, flush=True)
    out["lowest_cosine"] = round(min(cosines), 6)
    return out


def run(models: list[str], batches: list[int], repeats: int) -> dict:
    out = {"threads": {"onnxruntime_intra_op": onnx_backend.cores(),
                       "torch": torch.get_num_threads()},
           "batches": batches, "repeats": repeats, "models": {}}
    with tempfile.TemporaryDirectory() as cache:  # a fresh export, timed
        for spec in models:
            out["models"][spec] = measure(spec, batches, repeats, Path(cache))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,ViT-B-32")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    result = run(args.models.split(","), [int(b) for b in args.batches.split(",")],
                 args.repeats)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
