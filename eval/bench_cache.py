"""`sdvae cache-latents` throughput against the encoder alone.

    python eval/bench_cache.py                  # this machine, writes eval/results/bench_cache_<device>.*
    python eval/bench_cache.py --tiny-imagenet 10000 --bsds 200 --bsds-sd 200   # more images (a GPU)

Each row builds a fresh cache (`sdvae.cache.build_cache`: loader workers decoding/resizing/cropping and hashing,
encoding, parquet shard and record writes, with the VAE already loaded) and then encodes the same number of tensors of
the same bucket shapes, already in memory, with `codec.posterior` in a loop of the same batch size: the
model-only rate, measured before and after the cache and the faster kept (other processes on the machine
slow one pass more often than both). The ratio says how much of the encoder's speed the cache keeps; the load
average before each row is in the .json. The VAEs are random-init
presets (the same compute as trained ones). Images: ../shared/data (tiny-imagenet-val 64x64 JPEGs cached at
64 px, BSDS500 train 481x321 JPEGs at 256 px: the 320x192 and 192x320 buckets).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from sdvae.cache import bucket_sizes, build_cache, nearest_bucket  # noqa: E402
from sdvae.codec import load_vae  # noqa: E402
from sdvae.inputs import list_images  # noqa: E402
from sdvae.weights import as_dtype  # noqa: E402
from sdvae.models import build_vae  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"tiny-imagenet": (DATA / "tiny-imagenet-val" / "images", 64), "bsds500": (DATA / "bsds500" / "train", 256)}


def subset(folder: Path, count: int, work: Path) -> Path:
    """The first `count` images of `folder` (sorted), as symlinks in a folder of their own."""
    out = work / f"{folder.parent.name}-{count}"
    if not out.is_dir():
        out.mkdir(parents=True)
        for path in list_images(folder)[:count]:
            (out / path.name).symlink_to(path)
    return out


def model_only(codec, shapes: Counter, batch_size: int) -> float:
    """Seconds to encode, batch by batch, as many in-memory images of each (W, H) as the cache held."""
    batches = []
    for (w, h), n in shapes.items():
        x = torch.rand(min(n, batch_size), 3, h, w) * 2 - 1
        batches += [x[:min(batch_size, n - k)] for k in range(0, n, batch_size)]
    start = time.time()
    for x in batches:
        codec.posterior(x)
    return time.time() - start


def run(setups, work: Path, device: str, args) -> list[dict]:
    rows, codecs = [], {}
    for model, dataset, count, num_workers in setups:
        if model not in codecs:
            torch.manual_seed(0)
            build_vae(model).save_pretrained(work / model)
            codecs[model] = load_vae(str(work / model), device, as_dtype(args.dtype))
        codec = codecs[model]
        folder, resolution = DATASETS[dataset]
        data = subset(folder, count, work)
        codec.posterior(torch.zeros(1, 3, resolution, resolution))  # warm-up outside the timings
        load = os.getloadavg()[0]
        shapes = Counter(nearest_bucket(Image.open(p).size, bucket_sizes(resolution)) for p in list_images(data))
        before = model_only(codec, shapes, args.batch_size)
        cache_dir = work / f"cache-{model}-{dataset}-{num_workers}"
        start = time.time()
        report = build_cache(codec, data, cache_dir, resolution=resolution, batch_size=args.batch_size,
                             num_workers=num_workers, dtype=args.dtype, progress=False)
        seconds = time.time() - start
        cached_shapes = Counter()
        for shard in report["manifest"]["shards"]:
            for bucket, rows in shard["buckets"].items():
                cached_shapes[tuple(map(int, bucket.split("x")))] += rows
        if cached_shapes != shapes:  # EXIF rotations or unreadable files would make the passes differ
            raise RuntimeError(f"the cache's buckets {dict(cached_shapes)} are not the predicted {dict(shapes)}")
        after = model_only(codec, shapes, args.batch_size)
        model_seconds = min(before, after)
        cached = report["encoded"]
        rows.append(dict(model=model, data=dataset, resolution=resolution, images=cached,
                         skipped=report["skipped"], buckets={f"{w}x{h}": n for (w, h), n in sorted(shapes.items())},
                         num_workers=num_workers, cache_seconds=round(seconds, 2),
                         cache_images_per_sec=round(cached / seconds, 3),
                         cache_loop_images_per_sec=report["images_per_sec"],
                         model_only_seconds=round(model_seconds, 2),
                         model_only_passes_seconds=[round(before, 2), round(after, 2)], load_average_before=load,
                         model_only_images_per_sec=round(cached / model_seconds, 3),
                         ratio=round(model_seconds / seconds, 3)))
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-imagenet", type=int, default=2000, help="tiny-imagenet images for `tiny`")
    parser.add_argument("--tiny-imagenet-sd", type=int, default=160, help="tiny-imagenet images for sd-kl-f8")
    parser.add_argument("--bsds", type=int, default=120, help="BSDS500 images for `tiny`")
    parser.add_argument("--bsds-sd", type=int, default=32, help="BSDS500 images for sd-kl-f8")
    parser.add_argument("--models", nargs="*", default=["tiny", "sd-kl-f8"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers (default: min(4, CPUs))")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's; 1 gives steadier numbers when other work shares the CPU)")
    parser.add_argument("--out", default=None, help="results file stem (default eval/results/bench_cache_<device>)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"bench_cache: skipped: {DATA} is missing (the shared real-image folder this benchmark reads)")
        return

    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'CPU'}, " \
                                                                   f"{os.cpu_count()} cores"
    workers = min(4, os.cpu_count() or 1) if args.num_workers is None else args.num_workers
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_cache_{device}")
    work = Path(tempfile.mkdtemp(prefix="sdvae-bench-cache-"))
    setups = []  # model, dataset, images, loader workers
    for model in args.models:
        sd = model != "tiny"
        setups += [(model, "tiny-imagenet", args.tiny_imagenet_sd if sd else args.tiny_imagenet, workers),
                   (model, "bsds500", args.bsds_sd if sd else args.bsds, workers)]
    if "tiny" in args.models and workers:  # what the workers buy where loading costs most next to the model
        setups.insert(1, ("tiny", "tiny-imagenet", args.tiny_imagenet, 0))

    try:
        rows = run(setups, work, device, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the saved sd-kl-f8 weights alone are 335 MB

    loads = ", ".join(f"{r['load_average_before']:.1f}" for r in rows)
    header = (f"# Latent caching throughput: {name}\n\n"
              f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {args.dtype}, batch size "
              f"{args.batch_size}, {time.strftime('%Y-%m-%d')}. Command: `python eval/bench_cache.py "
              f"{' '.join(sys.argv[1:])}`.\n"
              "cache: `build_cache` end to end with the VAE loaded (loader workers decoding, resizing (Lanczos), "
              "cropping and hashing, encoding, parquet shard + record writes); model-only: `codec.posterior` on in-memory "
              "tensors of the same bucket shapes and batch size, the faster of a pass before and one after the cache. "
              "Random-init presets.\n"
              f"1-minute load average before each row (other work on the machine): {loads}.\n\n")
    lines = ["| model | data (cached at) | images | buckets | loader workers | cache images/s | model-only images/s "
             "| cache / model-only |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        buckets = ", ".join(f"{k}: {v}" for k, v in r["buckets"].items())
        lines.append(f"| {r['model']} | {r['data']} ({r['resolution']} px) | {r['images']} | {buckets} | "
                     f"{r['num_workers']} | {r['cache_images_per_sec']:.3g} | {r['model_only_images_per_sec']:.3g} | "
                     f"{r['ratio']:.2f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(
        device=name, machine=platform.platform(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
        dtype=args.dtype, batch_size=args.batch_size, command=sys.argv[1:], rows=rows), indent=2))
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
