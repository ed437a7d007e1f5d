"""`sdvae cache-latents` on one process with T threads against P processes (torchrun) with T/P threads each, and
each against the model-only encode rate of the same layout.

    python eval/bench_cache_scale.py                         # this CPU: 1 x 2 threads against 2 x 1 thread
    python eval/bench_cache_scale.py --device cuda --dtype bf16 --resolutions 256 512 --layouts 1x8 \
        --model sd-kl-f8 --images 2000                       # one GPU (the device script: eval/gpu_cache.sh)

A row runs the real command (`python -m sdvae cache-latents`, or `torchrun --nproc_per_node P -m sdvae
cache-latents`) from scratch on a folder of the first N images of ../shared/data/tiny-imagenet-val (64x64 JPEGs,
upscaled to the resolution's square bucket), timed from launch to exit with the VAE load subtracted (each process's
report gives its own time; the slowest counts). The model-only rate is P processes encoding the same number of
in-memory tensors of that shape at the same batch size, P at once, with the same threads each: what the encoder
alone would do in that layout. The ratio says how much of it the cache keeps, decoding, resizing and writing
included (goal: 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdvae.inputs import list_images  # noqa: E402
from sdvae.models import build_vae  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-val" / "images"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
MODEL_ONLY = """
import sys, time, torch
import sdvae
torch.set_num_threads({threads})
codec = sdvae.load_vae({vae!r}, {device!r}, {dtype!r}, backend="pytorch")
x = torch.rand({batch}, 3, {res}, {res}) * 2 - 1
codec.posterior(x[:1])  # warm-up
if {device!r}.startswith("cuda"): torch.cuda.synchronize()
start = time.time()
for _ in range({batches}):
    codec.posterior(x)
if {device!r}.startswith("cuda"): torch.cuda.synchronize()
print(time.time() - start)
"""


def subset(count: int, work: Path) -> Path:
    out = work / f"images-{count}"
    out.mkdir(parents=True, exist_ok=True)
    for path in list_images(DATA)[:count]:
        (out / path.name).symlink_to(path)
    return out


def model_only(vae: Path, processes: int, threads: int, images: int, args, resolution: int) -> float:
    """Images/s of `processes` processes encoding images/processes in-memory tensors each, all at once."""
    batches = max(1, images // processes // args.batch_size)
    script = MODEL_ONLY.format(threads=threads, vae=str(vae), device=args.device, dtype=args.dtype,
                               batch=args.batch_size, res=resolution, batches=batches)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)}) for _ in range(processes)]
    seconds = max(float(p.communicate()[0].split()[-1]) for p in procs)
    return processes * batches * args.batch_size / seconds


def cache_run(vae: Path, data: Path, out: Path, processes: int, threads: int, resolution: int, args) -> dict:
    command = ["cache-latents", "--vae", str(vae), "--data", str(data), "--out", str(out), "--resolution",
               str(resolution), "--no-buckets", "--batch-size", str(args.batch_size), "--shard-size",
               str(args.shard_size), "--dtype", args.dtype, "--backend", "pytorch"]
    if args.num_workers is not None:
        command += ["--num-workers", str(args.num_workers)]
    launcher = [sys.executable, "-m", "sdvae"] if processes == 1 else [TORCHRUN, "--nproc_per_node",
                                                                        str(processes), "-m", "sdvae"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    done = subprocess.run(launcher + command, env=env, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    manifest = json.loads((out / "manifest.json").read_text())
    records = [json.loads(p.read_text()) for p in (out / "done").glob("*.json")]
    encode_seconds = {}
    for r in records:  # per process: from its first unit's start to its last unit's end
        key = (r["host"], r["pid"])
        first, last = encode_seconds.get(key, (r["started"], r["finished"]))
        encode_seconds[key] = (min(first, r["started"]), max(last, r["finished"]))
    busy = max(last - first for first, last in encode_seconds.values())
    return dict(images=manifest["images"], wall_seconds=round(wall, 2), work_seconds=round(busy, 2),
                images_per_sec=round(manifest["images"] / busy, 3), processes_that_worked=len(encode_seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="PROCESSESxTHREADS")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--out", default=None, help="results file stem (default eval/results/bench_cache_scale_<device>)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"bench_cache_scale: skipped: {DATA} is missing (the shared real-image folder this benchmark reads)")
        return
    work = Path(tempfile.mkdtemp(prefix="sdvae-bench-scale-"))
    rows = []
    try:
        torch.manual_seed(0)
        build_vae(args.model).save_pretrained(work / "vae")
        data = subset(args.images, work)
        for resolution in args.resolutions:
            for layout in args.layouts:
                processes, threads = map(int, layout.split("x"))
                load = os.getloadavg()[0]
                cache = cache_run(work / "vae", data, work / f"cache-{resolution}-{layout}", processes, threads,
                                  resolution, args)
                rate = model_only(work / "vae", processes, threads, args.images, args, resolution)
                rows.append(dict(resolution=resolution, layout=layout, load_average_before=load, **cache,
                                 model_only_images_per_sec=round(rate, 3),
                                 ratio=round(cache["images_per_sec"] / rate, 3)))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_cache_scale_{args.device.split(':')[0]}")
    lines = [f"# cache-latents: processes x threads against the encoder alone: {device}", "",
             f"`{args.model}`, {args.dtype}, batch {args.batch_size}, {args.images} tiny-imagenet JPEGs in units of "
             f"{args.shard_size}, one square bucket, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}. "
             f"Command: `python eval/bench_cache_scale.py {' '.join(sys.argv[1:])}`. cache: the real command from "
             f"scratch, the slowest process's time from its first unit's start to its last unit's end (the VAE load "
             f"left out); model-only: the same processes and threads encoding in-memory tensors, all at once.", "",
             "| resolution | processes x threads | cache images/s | model-only images/s | cache / model-only | "
             "load before |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['layout']} | {r['images_per_sec']:.4g} | "
                     f"{r['model_only_images_per_sec']:.4g} | {r['ratio']:.2f} | {r['load_average_before']:.1f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(device=device, args=vars(args), rows=rows), indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
