"""Command line: `sdvae <command> ...` (also `python -m sdvae`, and `accelerate launch -m sdvae`)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .config import field_names, load_config, parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdvae", description="Train and use Stable-Diffusion-style KL autoencoders.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="train or fine-tune a VAE (no data given: a ~3 minute CPU demo on built-in photos)",
        description="Train a VAE. Settings come from --config FILE, then key=value overrides. "
                    f"Keys: {', '.join(field_names())}.")
    train.add_argument("--config", help="YAML file of settings (see train/configs/)")
    train.add_argument("--resume", help="'latest' or a checkpoint folder (same as resume=...)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the config file")
    train.set_defaults(run=run_train)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages break the progress bar
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"sdvae {args.command}: error: {e}", file=sys.stderr)
        return 2


def run_train(args) -> int:
    from . import demo
    from .train import train

    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["resume"] = args.resume
    cfg = load_config(args.config, overrides)
    notice = None
    if cfg.data is None:
        given = set(overrides) | set(_file_keys(args.config))
        settings = {k: v for k, v in demo.SETTINGS.items() if k not in given}
        cfg = load_config(args.config, overrides, defaults=settings)
        data, notice = demo.demo_defaults(cfg.output_dir, cfg.resolution, "perceptual_weight" in given)
        cfg = dataclasses.replace(cfg, **data)
        print(f"demo: training '{cfg.model}' on the photos scikit-image ships ({cfg.data}), "
              f"held-out crops in {cfg.val_data}")
        if notice:
            print(notice)
    metrics = train(cfg)
    if metrics:
        print(f"\nrun folder: {cfg.output_dir}")
        print(f"  diffusers export: {metrics['export']}  (AutoencoderKL.from_pretrained)")
        print(f"  metrics:          {cfg.output_dir}/metrics.json")
        print(f"  samples:          {cfg.output_dir}/samples/")
        if "validation" in metrics:
            v = metrics["validation"]
            print(f"  reconstructions:  {cfg.output_dir}/reconstructions.png")
            print(f"  held-out PSNR {v['psnr_mean']:.2f} dB, SSIM {v['ssim_mean']:.4f} on {v['images']} crops")
        print(f"  {metrics['steps']} steps in {metrics['wall_seconds']:.0f} s, {metrics['images_per_sec']:.1f} images/s")
        if notice:
            print(notice)
    return 0


def _file_keys(path) -> list[str]:
    if path is None:
        return []
    import yaml
    return list((yaml.safe_load(open(path)) or {}).keys())


if __name__ == "__main__":
    sys.exit(main())
