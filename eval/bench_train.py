"""Training throughput (images/s) of the real loop, with and without LPIPS and the discriminator.

    python eval/bench_train.py                      # this machine's CPU, writes eval/results/bench_train_cpu.*
    accelerate launch eval/bench_train.py --precision bf16   # on a GPU

Each row is one `sdvae.train.train` run on scikit-image's photos: N warm-up steps, then the rate over the
next N steps (the last log window). Without the VGG16 ImageNet weights in the torch cache, LPIPS runs on a
random VGG trunk written here: the same network and cost, other numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdvae.config import load_config  # noqa: E402
from sdvae.demo import prepare_data  # noqa: E402
from sdvae.downloads import vgg16_cache_path  # noqa: E402
from sdvae.train import train  # noqa: E402

SETUPS = {  # model, resolution, batch, steps (the same number again runs first, as warm-up)
    "tiny@128": ("tiny", 128, 8, 8),
    "sd-kl-f8@256": ("sd-kl-f8", 256, 1, 2),
}
LEVERS = {  # step-time levers, one added per row, on the first setup with reconstruction + KL (issue 15)
    "2 loader workers, decoding every epoch, default layout": dict(num_workers=2, image_cache_mb=0,
                                                                   channels_last=False),
    "0 loader workers": dict(num_workers=0, image_cache_mb=0, channels_last=False),
    "+ decoded images kept in memory": dict(num_workers=0, channels_last=False),
    "+ channels-last (today's defaults)": dict(),
}
VARIANTS = {
    "reconstruction + KL": dict(perceptual_weight=0.0),
    "+ LPIPS": dict(perceptual_weight=1.0),
    "+ discriminator": dict(perceptual_weight=0.0, disc_weight=0.5, disc_start=0),
    "+ LPIPS + discriminator": dict(perceptual_weight=1.0, disc_weight=0.5, disc_start=0),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--setups", nargs="*", default=list(SETUPS))
    parser.add_argument("--scale-steps", type=float, default=1.0, help="multiply the step counts (GPU: 10)")
    parser.add_argument("--out", default=None, help="results file stem (default eval/results/bench_train_<device>)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'CPU'}, " \
                                                                   f"{torch.get_num_threads()} threads"
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_train_{device}")
    work = Path(tempfile.mkdtemp(prefix="sdvae-bench-"))
    data, _ = prepare_data(work / "data", 256)
    vgg = None
    if not vgg16_cache_path().is_file():  # same compute with a random trunk; say so in the table
        import torchvision
        vgg = work / "vgg16-random.pth"
        torch.save({f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()}, vgg)

    def measure(setup: str, variant: str, settings: dict) -> dict:
        model, resolution, batch, steps = SETUPS[setup]
        steps = max(1, round(steps * args.scale_steps))
        cfg = load_config(overrides=dict(
            model=model, data=str(data), resolution=resolution, batch_size=batch, max_steps=2 * steps,
            log_every=steps, sample_every=10**9, checkpoint_every=10**9, preview_images=0,
            mixed_precision=args.precision, output_dir=str(work / f"{setup}-{variant}".replace(" ", "")),
            lpips_vgg_weights=str(vgg) if vgg else None, learning_rate=1e-5, **settings))
        start = time.time()
        rate = train(cfg)["last_logged"]["images_per_sec"]
        row = dict(setup=setup, variant=variant, batch=batch, images_per_sec=round(rate, 3),
                   seconds_per_step=round(batch / rate, 3), timed_steps=steps, run_seconds=round(time.time() - start, 1))
        print(row, flush=True)
        return row

    rows = [measure(setup, variant, settings) for setup in args.setups for variant, settings in VARIANTS.items()]
    levers = [measure(args.setups[0], lever, dict(VARIANTS["reconstruction + KL"], **settings))
              for lever, settings in LEVERS.items()]

    header = (f"# Training throughput: {name}\n\n"
              f"torch {torch.__version__}, precision {args.precision}, {time.strftime('%Y-%m-%d')}. "
              f"Command: `python eval/bench_train.py {' '.join(sys.argv[1:])}`.\n"
              f"Rate over the timed steps after warm-up, real data pipeline (scikit-image photos), today's "
              f"defaults (loader workers: {'none on the CPU' if device == 'cpu' else 'min(8, CPUs - 1)'}, decoded "
              f"images kept in memory, channels-last)."
              + ("\nLPIPS on a random VGG16 trunk (no ImageNet weights here): same cost." if vgg else "") + "\n\n")
    lines = ["| setup | loss terms | batch | images/s | s/step | vs reconstruction + KL |", "|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["setup"] == row["setup"])["images_per_sec"]
        lines.append(f"| {row['setup']} | {row['variant']} | {row['batch']} | {row['images_per_sec']:.3g} | "
                     f"{row['seconds_per_step']:.2f} | {row['images_per_sec'] / base:.2f}x |")
    images = len(list(data.iterdir()))
    lines += ["", f"Step-time levers, {args.setups[0]}, reconstruction + KL, one added per row. {images} training images "
              f"make {-(-images // SETUPS[args.setups[0]][2])} batches an epoch, and loader workers are started again "
              f"every epoch: on such a small set that restart is most of what workers cost.", "",
              "| loop | batch | images/s | s/step | vs first row |", "|---|---|---|---|---|"]
    for row in levers:
        lines.append(f"| {row['variant']} | {row['batch']} | {row['images_per_sec']:.3g} | "
                     f"{row['seconds_per_step']:.2f} | {row['images_per_sec'] / levers[0]['images_per_sec']:.2f}x |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(device=name, precision=args.precision, rows=rows,
                                                        levers=levers), indent=2))
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
