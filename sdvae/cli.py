"""Command line: `sdvae <command> ...` (also `python -m sdvae`, and `accelerate launch -m sdvae`)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from pathlib import Path

from .config import MAX_PIXELS, field_names, load_config, parse_overrides, read_config_file
from .errors import TrainingInterrupted
from .files import printable


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print escaped (\xe9), never fail
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages break the progress bar
    shown, warnings.showwarning = warnings.showwarning, one_line_warnings(args.command)
    try:
        check_flags(args)
        return args.run(args) or 0
    except TrainingInterrupted as e:
        if e.announce:  # the run's checkpoint and how to continue it
            print(f"sdvae {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"sdvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one boundary: every error is one line here, the traceback only with --debug
        if getattr(args, "debug", False):
            raise
        print(f"sdvae {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


def one_line_warnings(command: str):
    """Warnings as `sdvae COMMAND: warning: ...`, one line each, without Python's file, line and source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"sdvae {command}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
    return show


def describe(error: Exception) -> str:
    """One line: our own messages as they are; a foreign error with its type, and where to see more."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, RuntimeError, OSError)) and type(error).__module__ in ("builtins", "sdvae") \
            or type(error).__module__.startswith("sdvae."):
        return text
    return f"{type(error).__name__}: {text} (--debug shows where)"


def from_flags(settings_class, args):
    """A settings dataclass from the flags of the same names; it checks their values itself."""
    return settings_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings_class)})


def check_flags(args) -> None:
    """Values of the commands without a settings dataclass (eval's and cache-latents' check themselves)."""
    for flag in ("batch_size", "resolution", "max_images", "tile_size", "max_pixels"):
        value = getattr(args, flag, None)  # 0 would end in a ZeroDivisionError or a bare range() error
        if args.command not in ("eval", "cache-latents", "probe") and value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.command == "stats" and args.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8 (the VAE downsamples 8x), got {args.resolution}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of its one-line message")
    vae = argparse.ArgumentParser(add_help=False)
    vae.add_argument("--vae", required=True, help="run folder, diffusers folder or single file")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    device.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="VAE precision (default fp32; 16-bit pays off on GPUs and AVX512 CPUs)")
    device.add_argument("--backend", default=None, choices=["auto", "pytorch", "onnxruntime"],
                        help="auto (default, or $SDVAE_BACKEND): CPU fp32 runs whole images through ONNX graphs of "
                             "the VAE, exported and checked once and cached (faster); pytorch: PyTorch only; "
                             "onnxruntime: run a folder written by `sdvae export --format onnx`")
    overwrite = argparse.ArgumentParser(add_help=False)
    overwrite.add_argument("--overwrite", action="store_true",
                           help="replace an existing output that sdvae did not write (by default it is refused; "
                                "outputs sdvae wrote itself are replaced atomically)")
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("--max-pixels", type=int, default=None,
                        help=f"images larger than this are skipped (default {MAX_PIXELS:,}); raise it for panoramas")

    parser = argparse.ArgumentParser(prog="sdvae", description="Train and use Stable-Diffusion-style KL autoencoders.",
                                     parents=[common])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, run, parents=(), **kw):
        sub = commands.add_parser(name, parents=[common, *parents], **kw)
        sub.set_defaults(run=run)
        return sub

    for add in (add_train, add_convert_and_export, add_stats, add_encode_and_decode, add_cache, add_eval, add_probe,
                add_fp16, add_publish, add_fetch_weights):
        add(command, (vae, device, images, overwrite))
    return parser


def add_train(command, parents) -> None:
    """sdvae train: settings from --config and key=value overrides."""
    vae, device, images, overwrite = parents
    train = command("train", run_train,
                    help="train or fine-tune a VAE (no data given: a ~3 minute CPU demo on built-in photos)",
                    description="Train a VAE. Settings come from --config FILE, then key=value overrides. "
                                f"Keys: {', '.join(field_names())}.")
    train.add_argument("--config", help="YAML file of settings (see train/configs/)")
    train.add_argument("--resume", help="'latest' or a checkpoint folder (same as resume=...)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the config file")


def add_convert_and_export(command, parents) -> None:
    """sdvae convert / export: VAEs between layouts and formats."""
    vae, device, images, overwrite = parents
    convert = command("convert", run_convert, [overwrite],
                      help="convert a VAE between the diffusers and the original LDM layout (detects the input's; "
                           "whole SD/SDXL/SD3/FLUX checkpoints too)",
                      description="LDM single file (.safetensors, or .ckpt/.pt read with weights_only=True; whole "
                                  "SD / SDXL / SD3 / FLUX.1 checkpoints too, with their family's factors) -> "
                                  "diffusers folder; diffusers folder or state dict -> LDM single file. An existing "
                                  "output sdvae did not write is refused unless --overwrite.")
    convert.add_argument("source", help="the VAE to convert: a single file or a diffusers folder")
    convert.add_argument("out", help="a folder (from a single file) or a .safetensors file (from diffusers)")
    convert.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                         help="precision of the written weights (default fp32)")

    export = command("export", run_export, [overwrite],
                     help="export a run's (or any) VAE as a diffusers folder, a single file, TAESD's files or ONNX "
                          "graphs",
                     description="Write a VAE in the layout a client loads (README: 'Which client loads what'). "
                                 "diffusers and single-file exports decode two photos in fp16 first and record "
                                 "force_upcast from what they measure. An existing output sdvae did not write is "
                                 "refused unless --overwrite.")
    export.add_argument("source", help="run folder, diffusers folder or single file")
    export.add_argument("--format", default="diffusers", choices=["diffusers", "single-file", "taesd", "onnx"],
                        help="(default diffusers) single-file: the LDM layout (ComfyUI/A1111 load the SD "
                             "architecture's); taesd: a "
                             "tiny student as TAESD's taesd_encoder/decoder.safetensors (ComfyUI's vae_approx "
                             "previews); onnx: vae_encoder/model.onnx and vae_decoder/model.onnx (the layout of "
                             "diffusers' and optimum's ONNX pipelines), checked against PyTorch with onnxruntime")
    export.add_argument("--out", required=True, help="the folder (or, for single-file, the .safetensors file) to write")
    export.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="precision of the written weights (default fp32; onnx: fp32 only)")
    export.add_argument("--no-fp16-check", action="store_true",
                        help="skip the fp16 decode check that sets force_upcast")


def add_publish(command, parents) -> None:
    """sdvae publish: a model card, the diffusers files and the single file, uploaded to the Hugging Face hub."""
    vae, device, images, overwrite = parents
    publish = command("publish", run_publish, [overwrite],
                      help="stage a run as a Hugging Face model repo (model card, diffusers files, single file), or "
                           "a latent cache as a dataset repo, and upload it",
                      description="Stage RUN as a model repo in --out (model card with metadata, the diffusers files "
                                  "and the files UIs load) and upload it with huggingface_hub; a latent cache goes up "
                                  "as a dataset repo as it is. --dry-run stops before the upload.")
    publish.add_argument("source", metavar="RUN", help="run folder (or any VAE sdvae loads), or a latent cache "
                                                       "(sdvae cache-latents --out), which goes up as a dataset repo")
    publish.add_argument("--repo-id", required=True, help="owner/name on the Hugging Face hub")
    publish.add_argument("--private", action="store_true", help="create the Hub repo as private")
    publish.add_argument("--license", default="apache-2.0", help="the card's license (default apache-2.0)")
    publish.add_argument("--out", help="where the repo is staged (default RUN/publish)")
    publish.add_argument("--dry-run", action="store_true", help="stage the folder and stop: nothing is uploaded")


def add_stats(command, parents) -> None:
    """sdvae stats: latent mean and std, scaling and shift factors."""
    vae, device, images, overwrite = parents
    stats = command("stats", run_stats, [vae, images],
                    help="measure latent mean/std on a dataset; propose scaling/shift factors",
                    description="Encode centre crops of a dataset and report the per-channel and global mean and std "
                                "of the latents, the scaling_factor (1/std) and shift_factor (mean) diffusion training "
                                "should use, and how far the VAE's current factor is. Several processes (accelerate "
                                "launch / torchrun) split the images.")
    stats.add_argument("--data", required=True, help="image folder or Hugging Face dataset")
    stats.add_argument("--resolution", type=int, default=256, help="centre-crop size (default 256)")
    stats.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    stats.add_argument("--max-images", type=int, default=None, help="the first N images only (default all)")
    stats.add_argument("--mode", action="store_true", help="use the posterior mean instead of samples")
    stats.add_argument("--write", action="store_true", help="write scaling_factor (and shift_factor) to config.json")
    stats.add_argument("--shift", action="store_true", help="with --write: also write shift_factor (SD3/FLUX)")


def add_fp16(command, parents) -> None:
    """sdvae fp16-check / fp16-fix: where a VAE overflows half precision, and a copy that does not."""
    vae, device, images, overwrite = parents
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("vae", metavar="VAE", help="diffusers folder, run folder, single file or hub id (a KL VAE)")
    shared.add_argument("--resolution", type=int, default=128, help="side of the check images (default 128)")
    shared.add_argument("--max-images", type=int, default=8, help="check images (default 8)")
    check = command("fp16-check", run_fp16_check, [shared, overwrite],
                    help="each layer's largest activation against fp16's range, and whether fp16 decode is safe",
                    description="Encode and decode check images in fp32 while recording every layer's largest "
                                "|activation|; then in fp16. Prints the layers with the least headroom to 65504 and "
                                "whether fp16 encode/decode is finite and within 4 8-bit levels of fp32; writes "
                                "fp16-report.json (every layer) and activations.png to --out.")
    check.add_argument("--data", help="a folder of check images (default: held-out squares of the embedded photos)")
    check.add_argument("--out", default="fp16-check", help="output folder (default fp16-check)")
    fix = command("fp16-fix", run_fp16_fix, [shared, overwrite],
                  help="a copy of a VAE that decodes in fp16: exact rescaling, then a short decoder fine-tune",
                  description="Rescale the decoder exactly where GroupNorms allow it, then, if activations are "
                              "still too large, fine-tune the decoder (the encoder stays bit-identical) towards the "
                              "original's outputs with a penalty on activations above 65504/8. Exports --out/vae "
                              "(and vae.safetensors for the SD architecture) with force_upcast false only when the "
                              "fp16 decode of the check images is finite and within 4 levels of the original's fp32 "
                              "decode; writes fp16-report.json with the figures before and after.")
    fix.add_argument("--out", required=True, help="output folder")
    fix.add_argument("--data", help="images for the fine-tune (default: the embedded photos, minus the check strips)")
    fix.add_argument("--check-data", help="held-out check images (default: the embedded photos' held-out squares)")
    fix.add_argument("--steps", type=int, default=300, help="fine-tune steps, if one is needed (default 300)")
    fix.add_argument("--learning-rate", type=float, default=5e-3,
                     help="relative to each tensor's size (relative_lr; default 5e-3)")
    fix.add_argument("--batch-size", type=int, default=4, help="fine-tune batch (default 4)")
    fix.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more training settings for the fine-tune")


def run_fp16_check(args) -> int:
    from .fp16_fix import fp16_check_command

    fp16_check_command(args.vae, args.out, args.data, args.resolution, args.max_images, args.overwrite)
    return 0


def run_fp16_fix(args) -> int:
    from .fp16_fix import fp16_fix_command

    fp16_fix_command(args.vae, args.out, args.data, args.check_data, args.steps, args.learning_rate, args.resolution,
                     args.batch_size, args.max_images, parse_overrides(args.overrides), args.overwrite)
    return 0


def add_encode_and_decode(command, parents) -> None:
    """sdvae encode / decode: images <-> latent files."""
    vae, device, images, overwrite = parents
    for name, helptext in (("encode", "images (files or folders) -> latent files, one .safetensors per image"),
                           ("decode", "latent files written by `sdvae encode` -> PNG images at their original size")):
        sub = command(name, run_codec, [vae, device, overwrite] + ([images] if name == "encode" else []), help=helptext,
                      description=helptext[0].upper() + helptext[1:] + ". Unreadable inputs are skipped and named; "
                                  "outputs keep the inputs' subfolders. An existing file or folder sdvae did not write "
                                  "is refused unless --overwrite.")
        sub.add_argument("inputs", nargs="+", help="files and folders (searched recursively)" + (
            " of images" if name == "encode" else " of latent .safetensors files"))
        sub.add_argument("--out", required=True, help="output folder")
        sub.add_argument("--tiled", action=argparse.BooleanOptionalAction, default=None,
                         help="seam-free tiling (whole-image GroupNorm statistics, same result as untiled); "
                              "default: only when the untiled pass would not fit in memory")
        sub.add_argument("--tile-size", type=int, default=256, help="tiles of about N x N pixels (default 256)")
        sub.add_argument("--compile", action="store_true", help="torch.compile the network (slow first image)")
        if name == "encode":
            sub.add_argument("--raw", action="store_true", help="unscaled latents (no scaling/shift factor)")


def add_cache(command, parents) -> None:
    """sdvae cache-latents: a resumable latent cache."""
    vae, device, images, overwrite = parents
    cache = command("cache-latents", run_cache, [vae, device, images, overwrite],
                    help="encode images once into a resumable latent cache for diffusion training (one process or "
                         "many: torchrun, accelerate launch, a Slurm array)",
                    description="Resize and crop each image to an aspect-ratio bucket and store the VAE posterior's "
                                "mean and std (unscaled) in parquet shards, one per input shard, that "
                                "datasets.load_dataset(OUT, streaming=True) reads; sdvae.cache_reader.LatentShards "
                                "streams them. Every process started on one --out (torchrun / accelerate launch "
                                "ranks, Slurm array tasks, other machines) takes input shards nobody has done; "
                                "running the command again does only what is left or changed.")
    cache.add_argument("--data", required=True, nargs="+",
                       help="an image folder (searched recursively; slices of --shard-size images), webdataset tar "
                            "shards (a brace pattern 'shards/{00000..00099}.tar', a glob or several paths), parquet "
                            "files or a folder of them, a save_to_disk folder, or a Hugging Face dataset name")
    cache.add_argument("--out", required=True, help="cache folder")
    cache.add_argument("--resolution", type=int, default=256, help="buckets of about resolution² pixels (default 256)")
    cache.add_argument("--crop", default="center", choices=["center", "random"],
                       help="where the crop is taken (default center; random: seeded by --seed and the image)")
    cache.add_argument("--flip", action="store_true", help="also store the latents of the mirrored crops")
    cache.add_argument("--no-buckets", action="store_true", help="one square bucket, resolution x resolution")
    cache.add_argument("--batch-size", type=int, default=8, help="images per encoder batch (default 8)")
    cache.add_argument("--num-workers", type=int, default=None,
                       help="loader processes (default: min(4, CPUs), the CPUs split among torchrun's local ranks)")
    cache.add_argument("--shard-size", type=int, default=1024,
                       help="images per input unit of a folder (each tar or parquet file is a unit; default 1024)")
    cache.add_argument("--latent-dtype", default="fp32", choices=["fp32", "fp16"],
                       help="what the shards store (fp16: half the size; its error is in the README)")
    cache.add_argument("--image-column", default="image", help="the image column of parquet files and datasets")
    cache.add_argument("--split", default="train", help="split of a Hugging Face dataset (default train)")
    cache.add_argument("--claim-timeout", type=float, default=600,
                       help="seconds after which a unit whose worker stopped touching its claim is taken again "
                            "(a dead worker on this host is noticed at once; default 600)")
    cache.add_argument("--seed", type=int, default=0, help="seeds the random crops")
    cache.add_argument("--engine", default="local", choices=["local", "ray"],
                       help="local: this process (one of many under torchrun / a Slurm array); ray: Ray Data maps the "
                            "units over an actor pool, a GPU each where there are GPUs (pip install 'sdvae[ray]')")
    cache.add_argument("--ray-address", default=None, help="a running Ray cluster (default: $RAY_ADDRESS, else local)")
    cache.add_argument("--ray-actors", type=int, default=None, help="VAE actors (default: one per GPU, else 1)")


def comparison_flags() -> argparse.ArgumentParser:
    """What eval and probe share: the VAEs side by side, the images, the output, and the FID weights."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--vae", action="append", required=True, metavar="[NAME=]PATH",
                       help="run folder, diffusers folder or single file; repeat to compare (NAME labels it)")
    flags.add_argument("--data", required=True,
                       help="image folder (searched recursively), or a `datasets` dataset: save_to_disk folder, "
                            "parquet folder or hub name")
    flags.add_argument("--image-column", default="image", help="dataset column holding the images (default image)")
    flags.add_argument("--out", required=True, help="output folder (probe's also holds its latent caches and "
                                                    "checkpoints; run probe again to resume)")
    flags.add_argument("--fid-weights", metavar="FOLDER_OR_FILE",
                       help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its folder (default: torch hub "
                            "cache)")
    flags.add_argument("--no-fid", action="store_true", help="skip the FID (eval's rFID, probe's generation FID)")
    flags.add_argument("--no-download", action="store_true", help="never download missing metric weights")
    return flags


def add_eval(command, parents) -> None:
    """sdvae eval: reconstruction metrics of VAEs side by side."""
    vae, device, images, overwrite = parents
    ev = command("eval", run_eval, [device, images, overwrite, comparison_flags()],
                 help="reconstruction metrics (PSNR, SSIM, LPIPS, rFID) of one or more VAEs side by side",
                 description="Score VAEs on the same images with the protocol of the published tables "
                             "(sd-vae-ft-mse's model card): shorter side resized to --resolution, centre crop, "
                             "posterior mode, decode, clamp, 8 bits. Writes metrics.json, per_image.csv, table.md, "
                             "grid.png and psnr.png to --out.")
    ev.add_argument("--split", default="validation", help="dataset split (datasets only; default validation)")
    ev.add_argument("--resolution", type=int, default=256, help="shorter side and centre crop (default 256)")
    ev.add_argument("--full-size", action="store_true",
                    help="images as they are (padded to a multiple of 8, cropped back): Kodak and similar sets")
    ev.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mode")
    ev.add_argument("--seed", type=int, default=0, help="seeds the posterior samples (--sample)")
    ev.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    ev.add_argument("--max-images", type=int, default=None, help="the first N readable images (sorted by path)")
    ev.add_argument("--lpips-weights", action="append", metavar="FOLDER_OR_FILE",
                    help="vgg16-397923af.pth / alexnet-owt-7be5be79.pth, or a folder holding them "
                         "(default: the torch hub cache); repeatable")
    ev.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    ev.add_argument("--grid-images", type=int, default=3, help="images in grid.png (default 3, spread over the set)")


def add_probe(command, parents) -> None:
    """sdvae probe: how well a diffusion model learns each VAE's latents."""
    vae, device, images, overwrite = parents
    pr = command("probe", run_probe, [device, images, overwrite, comparison_flags()],
                 help="how well a latent diffusion model learns each VAE's latents: diagnostics and a diffusion probe",
                 description="Latent statistics, spectrum, equivariance and noise robustness, then the same small "
                             "denoiser trained with rectified flow on each VAE's normalised latents: loss curves, "
                             "held-out loss, samples and generation FID. Writes metrics.json, table.md, spectrum.png, "
                             "probe_loss.png, samples.png and equivariance.png to --out; run again to resume.")
    pr.add_argument("--val-data", help="held-out images (default: every 10th image of --data, left out of training)")
    pr.add_argument("--resolution", type=int, default=256, help="image side, a multiple of 16 (default 256)")
    budget = pr.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=2000, help="denoiser steps for every VAE (default 2000)")
    budget.add_argument("--minutes", type=float, default=None,
                        help="instead of --steps: the first VAE trains this long, the others as many steps")
    pr.add_argument("--denoiser", default="small", choices=["tiny", "small", "dit-s", "dit-b"],
                    help="small: a UNet for CPUs (default); tiny: a smaller one for quick checks; "
                         "dit-s / dit-b: DiT-S/2, DiT-B/2 for GPUs")
    pr.add_argument("--batch-size", type=int, default=32, help="denoiser batch (default 32)")
    pr.add_argument("--learning-rate", type=float, default=None, help="default 2e-4 (small), 1e-4 (DiT)")
    pr.add_argument("--seed", type=int, default=0, help="seeds the denoiser's init, batches, t and noise")
    pr.add_argument("--eval-every", type=int, default=None, help="steps between held-out losses (default steps/10)")
    pr.add_argument("--checkpoint-every", type=int, default=500, help="steps between denoiser checkpoints")
    pr.add_argument("--samples", type=int, default=64, help="samples for samples.png and gFID (default 64)")
    pr.add_argument("--sample-steps", type=int, default=25, help="Euler steps per sample (default 25)")
    pr.add_argument("--val-images", type=int, default=64, help="held-out images (default 64)")
    pr.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="the denoiser's")
    pr.add_argument("--split", default="train", help="split of a `datasets` --data (default train)")
    pr.add_argument("--val-split", default="validation", help="split of a `datasets` --val-data")
    pr.add_argument("--num-workers", type=int, default=None, help="latent-cache loader processes")


def add_fetch_weights(command, parents) -> None:
    """sdvae fetch-weights: the pretrained networks the losses and metrics use, into the torch hub cache."""
    command("fetch-weights", run_fetch_weights,
            help="download the weights LPIPS (VGG16, AlexNet) and FID (Inception) need into the torch hub cache",
            description="With a network: puts vgg16-397923af.pth (the training loss's LPIPS), alexnet-owt-7be5be79.pth "
                        "(eval's LPIPS) and pytorch-fid's Inception into the torch hub cache ($TORCH_HOME/hub/"
                        "checkpoints), where every command finds them; files already there are kept.")


def run_fetch_weights(args) -> int:
    from .downloads import FID_WEIGHTS_URL, LPIPS_TRUNKS, weights_file

    for url, what in ((LPIPS_TRUNKS["vgg"], "VGG16 (LPIPS)"), (LPIPS_TRUNKS["alex"], "AlexNet (LPIPS)"),
                      (FID_WEIGHTS_URL, "Inception (FID)")):
        print(f"{what}: {printable(weights_file(url, None, True, what))}")
    return 0


def run_train(args) -> int:
    from . import demo
    from .train import train

    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["resume"] = args.resume
    cfg = load_config(args.config, overrides)
    notice, is_demo = None, cfg.data is None
    if cfg.data is None:
        given = set(overrides) | set(read_config_file(args.config) if args.config else {})
        settings = {k: v for k, v in demo.SETTINGS.items() if k not in given}
        cfg = load_config(args.config, overrides, defaults=settings)
    if cfg.data is None:
        data, notice = demo.demo_defaults(cfg.output_dir, cfg.resolution, "perceptual_weight" in given)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in data.items() if k not in given})
        print(f"demo: training '{cfg.model}' on the photos scikit-image ships ({cfg.data}), "
              f"held-out crops in {cfg.val_data}")
        if notice:
            print(notice)
    metrics = train(cfg)
    if metrics:
        print(f"\nrun folder: {cfg.output_dir}")
        print(f"  diffusers export: {metrics['export']}  ({metrics['model_class']}.from_pretrained)")
        print(f"  metrics:          {cfg.output_dir}/metrics.json")
        print(f"  samples:          {cfg.output_dir}/samples/")
        if "validation" in metrics:
            v = metrics["validation"]
            print(f"  reconstructions:  {cfg.output_dir}/reconstructions.png")
            print(f"  held-out PSNR {v['psnr_mean']:.2f} dB, SSIM {v['ssim_mean']:.4f} on {v['images']} crops")
        print(f"  {metrics['steps']} steps in {metrics['wall_seconds']:.0f} s, {metrics['images_per_sec']:.3g} images/s")
        if is_demo:
            print(demo_pace(metrics["steps"], cfg.max_minutes))
        if notice:
            print(notice)
    return 0


def demo_pace(steps: int, minutes: float) -> str:
    """The demo stops on time: say how its steps compare with a normal run's, and how to train longer."""
    from .demo import TYPICAL_STEPS

    pace = f"  the demo stops after {minutes:g} minutes: {steps} steps here, about {TYPICAL_STEPS} on 2 idle CPU cores"
    if steps < TYPICAL_STEPS // 2:  # a busy or slow machine: blurry results have a reason
        pace += (f"; this machine was slower, so the reconstructions are rougher. Train longer with: sdvae train "
                 f"max_minutes={max(10, round(minutes * TYPICAL_STEPS / max(steps, 1)))}")
    return pace


def run_convert(args) -> int:
    from .export import convert

    direction, out = convert(args.source, args.out, args.dtype, overwrite=args.overwrite)
    print(f"{direction}: {out}")
    return 0


def run_export(args) -> int:
    from .export import check_format, fp16_check, save_diffusers, save_single_file, save_taesd
    from .files import refuse_foreign_output
    from .sources import load_pretrained_vae

    vae = load_pretrained_vae(args.source)  # refuses NaN weights, which the fp16 check would blame on fp16
    check_format(vae, args.format, printable(args.source), warn=False)  # refusals before the fp16 check's 20 s
    refuse_foreign_output(args.out, args.overwrite)
    if args.format == "onnx":
        return run_onnx_export(vae, args)
    if args.format == "taesd":  # a student: no fp16 check, as TAESD runs in fp16 without one
        out = save_taesd(vae, args.out, args.dtype, source=args.source, overwrite=args.overwrite)
        print(f"taesd: {printable(out)} (taesd_encoder.safetensors, taesd_decoder.safetensors)")
        return 0
    check = None if args.no_fp16_check else fp16_check(vae)
    if check:
        print(f"fp16 decode check on {check['images']} photos at {check['size']} px: max difference "
              f"{check['max_abs_diff']:.4f} (bound {check['bound']:.4f}), non-finite: {check['nonfinite']} "
              f"-> force_upcast: {str(check['force_upcast']).lower()}")
    if args.format == "single-file":
        out = save_single_file(vae, args.out, args.dtype, source=args.source, fp16=check, overwrite=args.overwrite)
    else:
        out = save_diffusers(vae, args.out, args.dtype, fp16=check, overwrite=args.overwrite)
    print(f"{args.format}: {out}")
    return 0


def run_onnx_export(vae, args) -> int:
    from .onnx import export_onnx

    if args.dtype != "fp32":
        raise ValueError("the ONNX export is fp32 (its parity with PyTorch is checked in fp32)")
    parity = export_onnx(vae, args.out, overwrite=args.overwrite)
    print(f"onnx: {printable(args.out)} (vae_encoder/model.onnx, vae_decoder/model.onnx); onnxruntime against PyTorch, max abs difference: encoder "
          f"{parity['encoder_max_abs_diff']:.2g}, decoder {parity['decoder_max_abs_diff']:.2g} (bound {parity['bound']:g})")
    return 0


def run_publish(args) -> int:
    from .publish import is_latent_cache, publish, stage, stage_cache

    if is_latent_cache(args.source):  # a latent cache goes up as a dataset repo, as it is
        folder = stage_cache(args.source, args.repo_id)
        if args.dry_run:
            print(f"dry run: {printable(folder)} is ready as the dataset repo {args.repo_id} (README.md, manifest.json, "
                  f"shards/, done/); nothing uploaded")
            return 0
        print(f"uploaded {printable(folder)} to https://huggingface.co/datasets/{args.repo_id}: "
              f"{publish(folder, args.repo_id, args.private, repo_type='dataset')}")
        return 0

    if not args.out and not Path(args.source).is_dir():  # RUN/publish only makes sense for a folder
        raise ValueError(f"{printable(args.source)} is not a folder: give --out, the folder to stage the repo in")
    out = Path(args.out or Path(args.source) / "publish")
    folder = stage(args.source, args.repo_id, out, args.license, overwrite=args.overwrite)
    if args.dry_run:
        staged = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # what would be uploaded
        print(f"dry run: staged {args.repo_id} in {printable(folder)} ({', '.join(staged)}); nothing uploaded")
        return 0
    print(f"uploaded {folder} to https://huggingface.co/{args.repo_id}: {publish(folder, args.repo_id, args.private)}")
    return 0


def run_stats(args) -> int:
    import json

    from accelerate import PartialState

    from .latents import config_path, latent_statistics, write_factors
    from .processes import several_processes_without_gpu
    from .sources import load_pretrained_vae

    if args.shift and not args.write:  # it would silently do nothing
        raise ValueError("--shift only chooses what --write writes; add --write")
    if args.write:
        config_path(args.vae)  # found out before the measurement, which can take long on a large dataset
    state = PartialState(cpu=several_processes_without_gpu())
    vae = load_pretrained_vae(args.vae).to(state.device)
    current = vae.config.scaling_factor
    result = latent_statistics(vae, args.data, args.resolution, args.batch_size, args.max_images,
                               sample=not args.mode, state=state, max_pixels=args.max_pixels)
    if not state.is_main_process:
        return 0
    print(json.dumps(result, indent=2))
    change = result["scaling_factor"] / current - 1
    print(f"latent std {result['std']:.5f}, mean {result['mean']:.5f} over {result['images']} images "
          f"({result['skipped']} unreadable skipped)")
    print(f"proposed scaling_factor {result['scaling_factor']:.5f} (config has {current}: {change:+.1%}); "
          f"shift_factor {result['shift_factor']:.5f} for the SD3/FLUX convention")
    if args.write:
        path = write_factors(args.vae, result["scaling_factor"], result["shift_factor"] if args.shift else None)
        print(f"written to {path}")
    return 0


def run_codec(args) -> int:
    import torch

    from .codec import decode_files, encode_files, load_vae

    missing = [printable(p) for p in args.inputs if not Path(p).exists()]
    if missing:  # before the model loads
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    codec = load_vae(args.vae, device, args.dtype, compile=args.compile, tile_size=args.tile_size,
                     backend=args.backend)
    if args.command == "encode":
        done, skipped = encode_files(codec, args.inputs, args.out, scaled=not args.raw, tiled=args.tiled,
                                     max_pixels=args.max_pixels, overwrite=args.overwrite)
    else:
        done, skipped = decode_files(codec, args.inputs, args.out, tiled=args.tiled, overwrite=args.overwrite)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not done:
        raise ValueError(f"nothing to {args.command}: all {len(skipped)} files were skipped (listed above)")
    print(f"{done} {'latents' if args.command == 'encode' else 'images'} in {printable(args.out)} "
          f"({len(skipped)} files skipped{', listed above' if skipped else ''})")
    return 0


def run_cache(args) -> int:
    from .cache import CacheSettings, build_cache

    data = args.data[0] if len(args.data) == 1 else args.data
    if args.engine == "ray":
        from .cache_ray import build_cache_ray

        report = build_cache_ray(args.vae, data, args.out, from_flags(CacheSettings, args), args.ray_actors,
                                 args.ray_address)
    else:
        report = build_cache(args.vae, data, args.out, from_flags(CacheSettings, args))
    for item in report["skipped_files"][:20]:
        print(f"skipped {printable(item['key'])}: {item['reason']}", file=sys.stderr)
    for shard in report["damaged_shards"]:
        print(f"damaged shard {shard['file']} ({shard['reason']}): its images were encoded again", file=sys.stderr)
    speed = f" ({report['images_per_sec']} images/s)" if report["encoded"] else ""
    print(f"{printable(args.out)}: {report['encoded_units']} of {report['units']} input shards encoded here "
          f"({report['encoded']} images{speed}, {report['skipped']} unreadable skipped), {report['reused_units']} "
          f"done before, {report['busy_units']} being encoded by other processes")
    manifest = report["manifest"]
    if manifest is None:
        print("the cache is complete once the other processes finish (the last one writes manifest.json)")
    elif not manifest["images"]:  # README: "no images at all is an error"
        raise ValueError(f"no readable images in {data} ({manifest['skipped']} unreadable, listed in "
                         f"{printable(args.out)}/done/*.json)")
    else:
        print(f"complete: {manifest['images']} images in {len(manifest['shards'])} shards, {manifest['skipped']} "
              f"skipped (each shard's in done/<shard>.json); manifest.json written")
    return 0


def run_eval(args) -> int:
    from .evaluate import EvalSettings, evaluate, markdown_table, parse_vae_specs

    result = evaluate(parse_vae_specs(args.vae), args.data, args.out, from_flags(EvalSettings, args))
    print(markdown_table(result))
    for item in result["skipped_files"][:20]:
        print(f"skipped {printable(item['path'])}: {item['reason']}", file=sys.stderr)
    print(f"written to {args.out}: metrics.json, per_image.csv, table.md, grid.png, psnr.png")
    return 0


def run_probe(args) -> int:
    from .evaluate import parse_vae_specs
    from .probe import ProbeSettings, probe
    from .probe_report import markdown_table

    result = probe(parse_vae_specs(args.vae), args.data, args.out, from_flags(ProbeSettings, args))
    print(markdown_table(result))
    print(f"written to {args.out}: metrics.json, table.md, spectrum.png, probe_loss.png, samples.png, "
          f"equivariance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
