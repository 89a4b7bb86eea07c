"""Checks of what a model knows beyond Flickr8k, all offline, and its encoding speed.

    .venv/bin/python scripts/generality.py --model default [--flickr8k ../shared/data/flickr8k]

- zero-shot: photographs that install with scikit-image, matplotlib and scikit-learn, each
  with a label written for clipdex (LABELS), classified among all the labels with
  evaluate.TEMPLATES; none of them is in Flickr8k;
- demo retrieval: Recall@1 both ways on data/demo (clipdex's own captions of those photos);
- ImageNet vocabulary: on Flickr8k test photographs (never trained on), how often the model's
  zero-shot choice among the 1,000 ImageNet class names agrees with the supervised
  EfficientNet-Lite2 classifier's top-1 (top-1 and top-5 agreement);
- speed: images/s (decode, preprocess, encode) and texts/s (tokenise, encode) on this machine.

It prints one JSON object; --json also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retrieval.inputs.captions import read_manifest, read_split
from retrieval.inputs.demo import demo_corpus
from retrieval.models.files import encode_image_files, iter_image_batches
from retrieval.models.inference import encode_texts
from retrieval.models.loading import load_model
from retrieval.training.evaluate import class_embeddings, evaluate

# file in the package's data folder -> the label clipdex wrote for it
LABELS = {
    "skimage": {
        "astronaut.png": "astronaut", "chelsea.png": "cat", "coffee.png": "cup of coffee",
        "rocket.jpg": "rocket", "camera.png": "photographer", "coins.png": "coins",
        "brick.png": "brick wall", "grass.png": "grass", "gravel.png": "gravel",
        "horse.png": "horse", "hubble_deep_field.jpg": "galaxy", "moon.png": "moon",
        "motorcycle_left.png": "motorcycle", "page.png": "page of text",
        "text.png": "street sign", "retina.jpg": "retina", "cell.png": "cell",
        "ihc.png": "stained tissue", "color.png": "colour wheel", "logo.png": "logo",
        "chessboard_RGB.png": "chessboard", "clock_motion.png": "clock",
    },
    "matplotlib": {"grace_hopper.jpg": "woman in uniform"},
    "sklearn": {"china.jpg": "temple", "flower.jpg": "flower"},
}


def _data_folder(package: str) -> Path:
    if package == "skimage":
        import skimage

        return Path(skimage.__file__).parent / "data"
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data"
    import sklearn

    return Path(sklearn.__file__).parent / "datasets" / "images"


def zero_shot(clip, folder: Path) -> dict[str, float]:
    rows = ["image,caption,label"]
    for package, labels in LABELS.items():
        for name, label in labels.items():
            shutil.copyfile(_data_folder(package) / name, folder / f"{package}-{name}")
            rows.append(f"{package}-{name},a photo of a {label},{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    results, _ = evaluate(clip, read_manifest(folder / "labels.csv"), workers=0)
    return {"images": results["images"], "top1": results["zeroshot_top1"]}


def demo_retrieval(clip) -> dict[str, float]:
    results, _ = evaluate(clip, demo_corpus(), workers=0)
    return {key: results[key] for key in ("t2i_R@1", "i2t_R@1", "t2i_R@5", "i2t_R@5")}


def imagenet_agreement(clip, flickr8k: Path, limit: int) -> dict[str, float]:
    """Zero-shot over the 1,000 ImageNet names vs the supervised Lite2 classifier's top-1."""
    from retrieval.training.imagenet import class_names, classifier_of

    teacher = load_model("clipdex-effnet2-minilm", device="cpu")
    names = read_split(flickr8k / "splits" / "test.txt")
    manifest = read_manifest(flickr8k / "captions.csv", image_root=flickr8k / "images",
                             split=names)
    paths = [item.image for item in manifest.items][:limit]
    weight, bias = classifier_of(teacher)
    trunk, tops = teacher.model.visual.trunk, []
    for batch in iter_image_batches(paths, teacher.preprocess, 64, 0):
        with torch.inference_mode():  # trunk: (n, 3, H, W) -> (n, 1280) pooled
            tops.append((trunk(batch.pixels) @ weight.T + bias).argmax(dim=1))
    teacher_top1 = torch.cat(tops).numpy()
    image_emb, _, _ = encode_image_files(clip, paths, workers=0)
    scores = image_emb @ class_embeddings(clip, class_names()).T  # (n, 1000)
    top5 = np.argsort(-scores, axis=1)[:, :5]
    return {"images": len(paths),
            "top1": round(100 * float(np.mean(top5[:, 0] == teacher_top1)), 2),
            "top5": round(100 * float(np.mean((top5 == teacher_top1[:, None]).any(axis=1))), 2)}


def speed(clip, flickr8k: Path | None, count: int = 256) -> dict[str, float]:
    """Images/s through decode + preprocess + encode, texts/s through tokenise + encode."""
    if flickr8k is not None:
        paths = sorted((flickr8k / "images").glob("*.jpg"))[:count]
        captions = read_manifest(flickr8k / "captions.csv", image_root=flickr8k / "images")
        texts = [c for item in captions.items[:count * 2] for c in item.captions][:count * 8]
    else:
        paths = [item.image for item in demo_corpus().items] * 8
        texts = [c for item in demo_corpus().items for c in item.captions] * 32
    encode_image_files(clip, paths[:16], workers=0)  # warm-up
    started = time.perf_counter()
    encode_image_files(clip, paths)
    images_per_s = len(paths) / (time.perf_counter() - started)
    encode_texts(clip, texts[:64])
    started = time.perf_counter()
    encode_texts(clip, texts)
    texts_per_s = len(texts) / (time.perf_counter() - started)
    return {"images_per_s": round(images_per_s, 1), "texts_per_s": round(texts_per_s, 1),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--flickr8k", type=Path, default=None)
    parser.add_argument("--imagenet-images", type=int, default=1000)
    parser.add_argument("--skip", nargs="*", default=[], choices=("speed", "imagenet"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    clip = load_model(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        results = {"model": args.model, "zero_shot_photos": zero_shot(clip, Path(tmp)),
                   "demo_retrieval": demo_retrieval(clip)}
    if args.flickr8k and "imagenet" not in args.skip:
        results["imagenet_agreement_flickr8k_test"] = imagenet_agreement(
            clip, args.flickr8k, args.imagenet_images)
    if "speed" not in args.skip:
        results["speed"] = speed(clip, args.flickr8k)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
