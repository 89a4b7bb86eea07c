"""Decode-only images/s on large JPEGs: a full decode against reduced-size (DCT-scaled) decoding
down to what the model needs, and how close the embeddings stay.

    .venv/bin/python bench/decode.py --model default --side 4000

The corpus is the demo photographs upscaled to SIDE x 0.75 SIDE and saved as JPEG quality 90
(a 12 MP photograph at 4000), decoded one after another on one thread; the demo photographs
themselves (mostly PNGs of about 512 px, which have no reduced-size decode) are timed too.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.inputs.demo import demo_corpus
from retrieval.inputs.images import DecodeLimits, draft_side_of, load_image
from retrieval.models.inference import encode_image_batch
from retrieval.models.loading import load_model


def large_jpegs(side: int) -> list[bytes]:
    files = []
    for item in demo_corpus().items:
        image = Image.open(item.image).convert("RGB").resize((side, side * 3 // 4), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def images_per_second(files: list[bytes], limits: DecodeLimits, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        for data in files:
            load_image(data, limits=limits)
    return len(files) * repeat / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--side", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clip = load_model(args.model, "cpu")
    files = large_jpegs(args.side)
    full, reduced = DecodeLimits(), DecodeLimits(draft_side=draft_side_of(clip.preprocess))
    full_rate = images_per_second(files, full, args.repeat)
    reduced_rate = images_per_second(files, reduced, args.repeat)
    demo = [Path(item.image).read_bytes() for item in demo_corpus().items]
    demo_rate = images_per_second(demo, reduced, args.repeat * 5)
    embed = [encode_image_batch(clip, torch.stack([clip.preprocess(load_image(d, limits=lim))
                                                    for d in files])) for lim in (full, reduced)]
    cosines = (embed[0] * embed[1]).sum(1)
    print(json.dumps({"images": len(files), "size": [args.side, args.side * 3 // 4],
                      "full_decode_per_s": round(full_rate, 1),
                      "reduced_decode_per_s": round(reduced_rate, 1),
                      "speedup": round(reduced_rate / full_rate, 2),
                      "demo_images": len(demo), "demo_decode_per_s": round(demo_rate, 1),
                      "cosine_min": round(float(cosines.min()), 5),
                      "cosine_mean": round(float(np.mean(cosines)), 5)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
