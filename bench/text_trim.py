"""Short-query text encoding: texts/s at real token length vs padded to the context length.

Usage: .venv/bin/python bench/text_trim.py [--model default] [--n 512] [--batch-size 64]
Prints one JSON line; the ratio is measured in one run on one machine, so it holds on a
noisy box even when the absolute figures do not.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from retrieval.models.inference import encode_texts
from retrieval.models.loading import load_model

SHORT_QUERIES = ["a dog", "red car", "a cat on a sofa", "two people hiking",
                 "sunset over the sea", "a child with a ball", "city street at night", "coffee"]


def texts_per_second(clip, texts: list[str], batch_size: int, trim: bool, repeats: int) -> float:
    encode_texts(clip, texts[:batch_size], batch_size=batch_size, trim=trim)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        encode_texts(clip, texts, batch_size=batch_size, trim=trim)
        best = min(best, time.perf_counter() - started)
    return len(texts) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    clip = load_model(args.model, device="cpu")
    texts = [SHORT_QUERIES[i % len(SHORT_QUERIES)] for i in range(args.n)]
    trimmed = texts_per_second(clip, texts, args.batch_size, True, args.repeats)
    padded = texts_per_second(clip, texts, args.batch_size, False, args.repeats)
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(),
                      "context_length": int(clip.tokenizer(["x"]).shape[1]),
                      "trimmed_texts_per_s": round(trimmed, 1),
                      "padded_texts_per_s": round(padded, 1),
                      "speedup": round(trimmed / padded, 2)}))


if __name__ == "__main__":
    main()
