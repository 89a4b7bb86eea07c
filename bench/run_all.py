"""Run every clipdex benchmark on this machine in one sequence; write docs/BENCHMARKS.md.

    make bench                                   # all parts, bounded sizes, ~10-15 min on 2 cores
    .venv/bin/python bench/run_all.py --parts ann,filtered,scaling --ann-count 1000000 \
        --filtered-count 1000000 --scale-sizes 10000,100000,1000000
                                                 # the goal sizes (not run by `make bench`)

Every headline figure is a ratio of two numbers measured in the same run on the same
machine (encoder FLOP/s over measured matmul FLOP/s, end-to-end over encode-only, ...), so it
holds on a shared, noisy box where the absolute figures do not. Results accumulate in
docs/bench_results.json: running a subset of --parts updates only those parts, and the
report (bench/report.py) is rebuilt from the whole file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts

import numpy as np
import torch

PARTS = ("encoder", "onnx", "decode", "indexing", "text_trim", "ann", "filtered", "service",
         "scaling")
TYPICAL_QUERY = "a brown dog running on the beach at sunset"  # ~10 tokens, a typical query


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matmul peak as torch sees it: best of `repeats` (size x size)^2."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _best_rate(fn, items: int, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN kernels)
    return items / min(_timed(fn) for _ in range(repeats))


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --- 1. encoder vs the hardware ------------------------------------------------------------

def encoder_part(args: argparse.Namespace) -> dict:
    from retrieval.models.inference import encode_image_batch, encode_texts, text_forward
    from retrieval.models.loading import load_model
    from retrieval.models.text import trim_padding

    peak = matmul_gflops()
    out = {"matmul_gflops": round(peak, 1), "models": {}}
    for spec in args.models.split(","):
        clip = load_model(spec, "cpu")
        size = clip.config["model_cfg"]["vision_cfg"].get("image_size", 224)
        size = size if isinstance(size, int) else size[0]
        padded = clip.tokenizer([TYPICAL_QUERY])  # (1, context_length)
        tokens = trim_padding(padded, clip.pad_token_id)  # (1, L): what clipdex encodes
        image_flops = count_flops(partial(clip.model.encode_image, torch.zeros(1, 3, size, size)))
        text_flops = count_flops(partial(text_forward, clip, padded, trim=True))
        texts = [TYPICAL_QUERY] * args.text_n
        text_rate = _best_rate(partial(encode_texts, clip, texts, batch_size=64), len(texts),
                               args.repeats)
        rows = {"text": _row(text_rate, text_flops, peak, batch=64, tokens=tokens.shape[1])}
        for batch in sorted({args.image_batch, args.image_batch_large}):
            pixels = torch.randn(batch, 3, size, size)
            rate = _best_rate(partial(encode_image_batch, clip, pixels), batch, args.repeats)
            rows[f"image_b{batch}"] = _row(rate, image_flops, peak, batch=batch)
        out["models"][spec] = {"image_flops": image_flops, "text_flops": text_flops,
                               "image_size": size, "rows": rows}
        print(json.dumps({spec: rows}), flush=True)
    return out


def _row(rate: float, flops: int, peak_gflops: float, **extra) -> dict:
    achieved = rate * flops / 1e9
    return {"items_per_s": round(rate, 1), "gflops_per_item": round(flops / 1e9, 3),
            "achieved_gflops": round(achieved, 1),
            "utilisation": round(achieved / peak_gflops, 3), **extra}


# --- 1b. ONNX Runtime vs torch eager -------------------------------------------------------

def onnx_part(args: argparse.Namespace) -> dict:
    from onnx_speed import run

    out = run(args.onnx_models.split(","), [1, 8, 32], args.repeats + 2)
    out["command"] = (".venv/bin/python bench/onnx_speed.py --models " + args.onnx_models +
                      f" --repeats {args.repeats + 2}")
    return out


# --- 2. indexing pipeline ------------------------------------------------------------------

def indexing_part(args: argparse.Namespace) -> dict:
    """The demo corpus's PNGs, and photographs (JPEGs) where `--photos` is a folder."""
    command = [sys.executable, "bench/indexing.py", "--model", "default", "--workers", "2"]
    out = _indexing_median([*command, "--repeat", str(args.index_repeat)])
    if args.photos.is_dir():
        out["photos"] = _indexing_median([*command, "--images", os.path.relpath(args.photos, ROOT),
                                          "--count", str(args.photo_count), "--repeat", "1"])
    return out


def _indexing_median(command: list[str]) -> dict:
    runs = []
    for _ in range(3):  # single runs swung from 0.66 to 0.96 on a shared 2-core VM
        figures = _run_script(command)
        figures["ratio"] = round(figures["end_to_end_img_s"] / figures["encode_only_img_s"], 3)
        # Decode-only and encode-only each had every core; sharing them, an image costs at
        # least 1/encode + 1/decode seconds of the machine: the bound on the ratio.
        figures["bound"] = round(figures["decode_only_img_s"] / (
            figures["decode_only_img_s"] + figures["encode_only_img_s"]), 3)
        runs.append(figures)
    runs.sort(key=lambda run: run["ratio"])
    median = runs[len(runs) // 2]
    median["ratios"] = [run["ratio"] for run in runs]
    return median


# --- 2b. reduced-size decoding ------------------------------------------------------------

def decode_part(args: argparse.Namespace) -> dict:
    return _run_script([sys.executable, "bench/decode.py", "--model", "default"])


# --- 3. short text queries -----------------------------------------------------------------

def text_trim_part(args: argparse.Namespace) -> dict:
    from text_trim import SHORT_QUERIES, texts_per_second

    from retrieval.models.loading import load_model

    clip = load_model("default", "cpu")
    texts = [SHORT_QUERIES[i % len(SHORT_QUERIES)] for i in range(args.text_n)]
    trimmed = texts_per_second(clip, texts, 64, True, args.repeats)
    padded = texts_per_second(clip, texts, 64, False, args.repeats)
    return {"model": "default", "context_length": int(clip.tokenizer(["x"]).shape[1]),
            "trimmed_texts_per_s": round(trimmed, 1), "padded_texts_per_s": round(padded, 1),
            "ratio": round(trimmed / padded, 2)}


# --- 4. ANN vs exact -----------------------------------------------------------------------

def ann_part(args: argparse.Namespace) -> dict:
    import faiss
    from ann import gap_data

    from retrieval.ann import engines as ann
    from retrieval.ann import tuning

    dim = 512
    images, captions = gap_data(args.ann_count, args.ann_queries, dim)
    ids = np.arange(1, args.ann_count + 1, dtype=np.int64)
    flat = faiss.IndexFlatIP(dim)
    flat.add(images)
    flat.search(captions[:10], 10)  # warm-up
    flat_qps = len(captions) / _timed(lambda: flat.search(captions, 10))
    # One query per call, as a search request arrives: no batch for BLAS to amortise.
    singles = [captions[i:i + 1] for i in range(min(args.ann_single, len(captions)))]
    flat_single_qps = len(singles) / _timed(lambda: [flat.search(q, 10) for q in singles])
    flat.reset()  # free the exact index before building the approximate one
    spec = ann.choose_index(args.ann_count, dim, args.max_memory)
    started = time.perf_counter()
    index = ann.build_index(spec, images, ids)
    build_s = time.perf_counter() - started
    tuned, report = tuning.tune(index, spec, images, ids, captions, query_source="captions")
    lookup = ann.sorted_lookup(ids, images)
    single_qps = len(singles) / _timed(
        lambda: [ann.search(index, q, 10, tuned.params, lookup) for q in singles])
    stored = len(faiss.serialize_index(index))
    return {"count": args.ann_count, "dim": dim, "queries": args.ann_queries,
            "max_memory": args.max_memory, "kind": spec.kind, "factory": spec.factory,
            "build_s": round(build_s, 1), "flat_qps": round(flat_qps, 1),
            "recall_at_10": report["recall_at_10"], "qps": report["qps"],
            "tuning_recall_at_10": report["tuning_recall_at_10"],
            "held_out_queries": report["held_out_queries"], "rerank": report["rerank"],
            "qps_ratio": round(report["qps"] / flat_qps, 2), "param": report["param"],
            "single_queries": len(singles), "flat_single_qps": round(flat_single_qps, 1),
            "single_qps": round(single_qps, 1),
            "single_qps_ratio": round(single_qps / flat_single_qps, 2),
            "value": report["value"], "curve": report["curve"],
            "bytes_per_vector_measured": round(stored / args.ann_count, 1),
            "bytes_per_vector_formula": round(spec.memory_bytes / args.ann_count, 1),
            "M": spec.params.get("M")}


# --- 4b. filtered search and search modes --------------------------------------------------

def filtered_part(args: argparse.Namespace) -> dict:
    from filtered import measure

    with tempfile.TemporaryDirectory() as tmp:
        out = measure(args.filtered_count, 512, None, args.filtered_queries, Path(tmp),
                      max_memory=args.max_memory)
    out["command"] = (f"python -m bench.filtered --count {args.filtered_count} "
                      f"--queries {args.filtered_queries} --max-memory {args.max_memory}")
    return out


# --- 4c. an index larger than RAM (make bench-scale) ---------------------------------------

def disk_part(args: argparse.Namespace) -> dict:
    return _scale_disk(args.disk_count, args.disk_memory, args.disk_index_type,
                       args.disk_target_recall)


def ray_part(args: argparse.Namespace) -> dict:
    """Ray local mode ÷ single-process `index build` images/s, same corpus, one run."""
    return _run_script([sys.executable, "bench/ray_indexing.py", "--model", "default",
                        "--repeat", str(args.ray_repeat)])


def disk_1m_part(args: argparse.Namespace) -> dict:
    """4d: the same 1,000,000 vectors imported twice, lists on disk under 2GB and the
    in-memory HNSW index, each served and asked the same queries over HTTP."""
    return {"disk": _scale_disk(1_000_000, "2GB", "ivfpq-disk"),
            "hnsw": _scale_disk(1_000_000, "4GB", "hnsw")}


def _scale_disk(count: int, memory: str, index_type: str | None,
                target_recall: float | None = None) -> dict:
    command = [sys.executable, "bench/scale_disk.py", "--count", str(count),
               "--max-memory", memory]
    command += ["--index-type", index_type] if index_type else []
    command += ["--target-recall", str(target_recall)] if target_recall else []
    return _run_script(command)


def _run_script(command: list[str]) -> dict:
    """Run a bench script in its own process: the JSON object it prints, with the command
    that reproduces it."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout[result.stdout.index("{"):])
    figures["command"] = " ".join(["python", *command[1:]])
    return figures


# --- 5. service ----------------------------------------------------------------------------

def service_part(args: argparse.Namespace) -> dict:
    import service

    from retrieval.models.inference import encode_texts
    from retrieval.models.loading import load_model

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    out = {"model": "default", "items": args.service_items, "seconds": args.service_seconds,
           "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, index = service.prepare("default", Path(tmp), args.service_items)
        # torch both ways (the batching figures), then batched on ONNX Runtime
        for mode, max_batch, backend in (("batched", args.max_batch, "torch"),
                                         ("unbatched", 1, "torch"),
                                         ("batched_onnx", args.max_batch, "onnx")):
            url = f"http://127.0.0.1:{args.port}"
            process = service.serve(checkpoint, index, args.port, max_batch, args.max_wait_ms,
                                    queue=max(256, 4 * max(concurrencies)), backend=backend)
            try:
                service.wait_ready(url, process)
                rows = {}
                for concurrency in concurrencies:
                    rows[str(concurrency)] = asyncio.run(
                        service.load(url, concurrency, 10**7, args.service_seconds))
                    print(mode, concurrency, json.dumps(rows[str(concurrency)]), flush=True)
                out["modes"][mode] = {"max_batch": max_batch, "backend": backend, "mean_batch":
                                      service.batch_sizes(url), "by_concurrency": rows}
            finally:
                process.terminate()
                process.wait(timeout=30)
    clip = load_model("default", "cpu")  # the raw encoder on the service's own queries
    texts = [service.query_text(n) for n in range(args.text_n)]
    out["raw_texts_per_s"] = round(_best_rate(
        lambda: encode_texts(clip, texts, batch_size=args.max_batch), len(texts),
        args.repeats), 1)
    # The model's own ceiling for what batching can buy: one text per call vs full batches.
    few = texts[:64]
    out["raw_single_texts_per_s"] = round(_best_rate(
        lambda: [encode_texts(clip, [text]) for text in few], len(few), args.repeats), 1)
    return out


# --- 6. scaling ----------------------------------------------------------------------------

def scaling_part(args: argparse.Namespace) -> dict:
    """Each size in a fresh process, so VmHWM is that build's peak and nothing else's."""
    rows = []
    for count in [int(n) for n in args.scale_sizes.split(",")]:
        kinds = [None, "hnsw"] if count < 20_000 else [None]  # auto, and like-for-like HNSW
        for kind in kinds:
            command = [sys.executable, __file__, "--scale-child", str(count),
                       "--max-memory", args.max_memory] + (["--scale-kind", kind] if kind else [])
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return {"dim": 512, "rows": rows, "max_memory": args.max_memory}


def scale_child(count: int, kind: str | None, max_memory: str) -> None:
    from retrieval.ann import engines as ann
    def rss() -> float:  # peak RSS in MiB; VmHWM is per address space (ru_maxrss survives exec)
        line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                    if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, 512), dtype=np.float32)  # (n, 512) unit rows
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(count, dtype=np.int64)
    before = rss()
    spec = ann.choose_index(count, 512, max_memory, kind=kind)
    started = time.perf_counter()
    ann.build_index(spec, vectors, ids)
    build_s = time.perf_counter() - started
    print(json.dumps({"count": count, "kind": spec.kind, "forced": kind is not None,
                      "factory": spec.factory, "build_s": round(build_s, 2),
                      "rss_before_build_mib": round(before, 1), "peak_rss_mib": round(rss(), 1),
                      "data_mib": round(vectors.nbytes / 2**20, 1),
                      "estimate_mib": round(spec.memory_bytes / 2**20, 1)}))


RUNNERS = {"encoder": encoder_part, "onnx": onnx_part, "decode": decode_part,
           "indexing": indexing_part, "text_trim": text_trim_part,
           "ann": ann_part, "filtered": filtered_part, "disk": disk_part,
           "disk_1m": disk_1m_part, "ray": ray_part, "service": service_part, "scaling": scaling_part}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"subset of {PARTS}, or disk, disk_1m, ray (make bench-scale)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="ViT-B-32,default")
    parser.add_argument("--onnx-models", default="default,ViT-B-32")
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--image-batch-large", type=int, default=128)
    parser.add_argument("--text-n", type=int, default=256)
    parser.add_argument("--index-repeat", type=int, default=20,
                        help="passes over the 22 demo images (440: fixed costs amortised)")
    parser.add_argument("--photos", type=Path,
                        default=ROOT.parent / "shared/data/flickr8k/images",
                        help="the indexing part's folder of photographs, where it exists")
    parser.add_argument("--photo-count", type=int, default=1000)
    parser.add_argument("--ann-count", type=int, default=100_000, help="goal size: 1000000")
    parser.add_argument("--ann-queries", type=int, default=1000)
    parser.add_argument("--ann-single", type=int, default=200,
                        help="queries timed one per call (as requests arrive)")
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--filtered-count", type=int, default=100_000,
                        help="goal size: 1000000")
    parser.add_argument("--filtered-queries", type=int, default=200)
    parser.add_argument("--disk-count", type=int, default=10_000_000,
                        help="the disk part (make bench-scale): vectors to build")
    parser.add_argument("--disk-memory", default="2GB")
    parser.add_argument("--disk-index-type", default=None)
    parser.add_argument("--disk-target-recall", type=float, default=None,
                        help="the disk part: index build --target-recall (the goal: >= 0.9)")
    parser.add_argument("--ray-repeat", type=int, default=200,
                        help="the ray part: copies of the 22 demo images to index both ways")
    parser.add_argument("--service-items", type=int, default=5000)
    parser.add_argument("--service-seconds", type=float, default=10)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="the service's CPU default; batches of 32 suit a GPU")
    parser.add_argument("--max-wait-ms", type=float, default=0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--scale-sizes", default="10000,100000", help="add 1000000 for the goal")
    parser.add_argument("--scale-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scale-kind", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _at_goal_size(part: str, args: argparse.Namespace) -> bool:
    if part == "ann":
        return args.ann_count >= 1_000_000
    if part == "filtered":
        return args.filtered_count >= 1_000_000
    if part == "scaling":
        return max(int(size) for size in args.scale_sizes.split(",")) >= 1_000_000
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.scale_child is not None:
        scale_child(args.scale_child, args.scale_kind, args.max_memory)
        return 0
    import report

    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "bench_results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    results["machine"] = machine()
    started = time.perf_counter()
    for part in args.parts.split(","):
        part_started = time.perf_counter()
        print(f"== {part}", flush=True)
        key = part + report.GOAL_SUFFIX if _at_goal_size(part, args) else part
        results[key] = RUNNERS[part](args)
        results[key]["wall_s"] = round(time.perf_counter() - part_started, 1)
        results[key]["command"] = results[key].get("command") or " ".join(
            [".venv/bin/python bench/run_all.py", *(argv if argv is not None else sys.argv[1:])])
        store.write_text(json.dumps(results, indent=2) + "\n")  # survive a later failure
    results["machine"]["wall_s"] = round(time.perf_counter() - started, 1)
    results["machine"]["parts_run"] = args.parts
    store.write_text(json.dumps(results, indent=2) + "\n")
    report.write(results, args.out)
    print(f"wrote {args.out / 'BENCHMARKS.md'} in {results['machine']['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
