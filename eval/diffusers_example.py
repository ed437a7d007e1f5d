"""Run diffusers' example trainer `train_autoencoderkl.py` offline and for a fixed wall time (bench_quality's peer).

    python eval/diffusers_example.py PATH/train_autoencoderkl.py --minutes 10 --out DIR -- --resolution 128 ...

The script is not in the diffusers package: take it from a diffusers checkout
(`examples/research_projects/autoencoderkl/train_autoencoderkl.py`; it imports `taming-transformers` for its
discriminator). It runs unchanged, in this process, with three things arranged around it:
- LPIPS: it builds `lpips.LPIPS(net="vgg")`, which downloads the VGG16 trunk. Here it gets the trunk from
  `--lpips-vgg-weights` or the torch hub cache when the file is there, and a random one otherwise; the example computes LPIPS under `no_grad`, so the
  value trains nothing either way, but the pass costs the same time.
- Wall time: its training loop's progress bar ("Steps") is updated once per optimiser step. `--minutes` after that bar
  starts, the update ends the run between two steps, and the VAE is saved as the script saves it at the end
  (`save_pretrained(output_dir)`), with `example_run.json` (steps, seconds).
- Its `check_min_version` asks for a diffusers development release; the installed release is accepted.
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path


class TimeUp(Exception):
    pass


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", type=Path)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the script's --output_dir")
    parser.add_argument("--lpips-vgg-weights", type=Path, default=None, help="default: the torch hub cache")
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)  # after --: the script's own flags
    args, script_args = parser.parse_args(sys.argv[1:cut]), sys.argv[cut + 1:]
    if not args.script.is_file():
        raise SystemExit(f"not found: {args.script}")

    import diffusers
    import diffusers.utils
    import lpips
    import tqdm.auto

    from sdvae.losses import build_lpips
    from sdvae.downloads import vgg16_cache_path

    trunk = args.lpips_vgg_weights is not None or vgg16_cache_path().is_file()
    perceptual = build_lpips(args.lpips_vgg_weights, download=False, pretrained_trunk=trunk)
    lpips.LPIPS = lambda *a, **k: perceptual
    diffusers.utils.check_min_version = lambda *a, **k: None
    built = []
    from_config = diffusers.AutoencoderKL.from_config

    def keep_model(*a, **k):
        built.append(from_config(*a, **k))
        return built[-1]

    diffusers.AutoencoderKL.from_config = keep_model
    clock = {}

    class TimedBar(tqdm.auto.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.desc.startswith("Steps"):
                clock.setdefault("start", self.start_t)
                if time.time() - clock["start"] >= args.minutes * 60:
                    raise TimeUp(self.n)

    tqdm.auto.tqdm = TimedBar
    sys.argv = [str(args.script), "--output_dir", str(args.out), *script_args]
    try:
        runpy.run_path(str(args.script), run_name="__main__")
        steps = None  # it reached its own max_train_steps and saved itself
    except TimeUp as up:
        steps = up.args[0]
        built[-1].save_pretrained(args.out)
    seconds = time.time() - clock["start"] if "start" in clock else None
    (args.out / "example_run.json").write_text(json.dumps(dict(steps=steps, wall_seconds=seconds)) + "\n")
    print(f"diffusers example: {steps} steps in {seconds:.0f} s, saved to {args.out}")


if __name__ == "__main__":
    main()
