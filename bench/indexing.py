"""Indexing throughput: decode-only, encode-only and end-to-end images/s, on the demo corpus
(scikit-image's PNGs, repeated) or on a folder of photographs (`--images`, the first `--count`
files by name).

    .venv/bin/python bench/indexing.py --model clipdex-tiny --workers 2 --repeat 5 [--backend torch]
    .venv/bin/python bench/indexing.py --model default --images ../shared/data/flickr8k/images \
        --count 1000 --repeat 1

decode-only: DataLoader workers decode + preprocess, nothing encoded;
encode-only: pre-decoded pixel batches through the image tower;
end-to-end: `indexer.build.build` (decode, encode, texts, FAISS, SQLite, manifest).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from indexer.build import BuildConfig, build
from retrieval.inputs.demo import DEMO_DIR, ensure_demo_corpus
from retrieval.models.files import iter_image_batches
from retrieval.models.inference import encode_image_batch
from retrieval.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="clipdex-tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5, help="passes over the images")
    parser.add_argument("--images", type=Path, default=None,
                        help="a folder of .jpg/.png files (default: the demo corpus)")
    parser.add_argument("--count", type=int, default=None, help="how many of --images")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"),
                        help="what encodes (auto: what `clipdex index build` picks)")
    args = parser.parse_args()
    if args.images is None:
        ensure_demo_corpus()
    folder = args.images or DEMO_DIR
    clip = load_model(args.model, "cpu", backend=args.backend)
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    paths = found[:args.count] * args.repeat

    started = time.perf_counter()
    batches = list(iter_image_batches(paths, clip.preprocess, args.batch_size, args.workers,
                                      uint8=True))  # as the indexer does
    decode = len(paths) / (time.perf_counter() - started)

    started = time.perf_counter()
    for batch in batches:
        encode_image_batch(clip, batch.pixels)
    encode = len(paths) / (time.perf_counter() - started)

    images = sorted(set(paths))
    with tempfile.TemporaryDirectory() as temp:
        corpus = Path(temp) / "corpus"  # copies, so the build sees len(paths) distinct files
        for copy in range(args.repeat):
            for image in images:
                target = corpus / str(copy) / image.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, target)
        config = BuildConfig(batch_size=args.batch_size, workers=args.workers)
        started = time.perf_counter()
        summary = build([corpus], Path(temp) / "index", clip, config)
        end_to_end = summary.images / (time.perf_counter() - started)
    print(json.dumps({"model": args.model, "backend": clip.backend, "workers": args.workers,
                      "corpus": "demo" if args.images is None else str(args.images),
                      "images": len(paths),
                      "decode_only_img_s": round(decode, 1), "encode_only_img_s": round(encode, 1),
                      "end_to_end_img_s": round(end_to_end, 1),
                      "end_to_end_images": summary.images, "distinct_images": len(images),
                      "cpu_threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
