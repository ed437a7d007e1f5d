"""Quality per hour of compute: train for a fixed wall time, then score on photos no run trained on.

    python eval/bench_quality.py                               # sdvae's tiny defaults, 10 minutes on this CPU
    python eval/bench_quality.py --minutes 10 --name lr1e-3 learning_rate=1e-3 resolution=64   # a recipe variant
    python eval/bench_quality.py --minutes 5 --sets "Kodak 256" --results bench_quality_screen_cpu \
        --name "C2 + batch_size=2" batch_size=2                # a 5-minute screen of one setting

Training data: BSDS500 train + test (400 photos, `../shared/data`). Each trainer runs `--minutes` of wall time with
`perceptual_weight=0`, and once more with its perceptual term when the VGG16 weights are in the torch hub cache or
given (`--lpips-vgg-weights`), then `sdvae eval` scores the export on Kodak at 256 px (shorter side
resized, centre crop), Kodak at full size and BSDS500 val at 256 px. Rows are added to (or replaced in)
eval/results/bench_quality_cpu.json, and the table eval/results/bench_quality_cpu.md is written from it.

The peer is diffusers' example trainer, `train_autoencoderkl.py`, which is not in the diffusers package: pass a copy
from a diffusers checkout (`--diffusers-example PATH`, or the DIFFUSERS_EXAMPLE environment variable; it needs
`pip install taming-transformers`), and it runs the same minutes on the same folder through eval/diffusers_example.py
(lr 1e-4, MSE, batch 8, 128 px, the same `tiny` architecture); without it its row says why it was skipped.

    python eval/bench_quality.py --diffusers-example ~/diffusers/examples/research_projects/autoencoderkl/train_autoencoderkl.py
    python eval/bench_quality.py --only-example --diffusers-example PATH      # the peer's row alone
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sdvae.downloads import vgg16_cache_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SETS = {  # label: (folder, extra sdvae eval flags)
    "Kodak 256": ("kodak", []),
    "Kodak full": ("kodak", ["--full-size"]),
    "BSDS500 val 256": ("bsds500/val", []),
}


def training_folder(work: Path) -> Path:
    """BSDS500 train + test as one folder of links (val stays held out)."""
    folder = work / "bsds500-train-test"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        for f in sorted((DATA / "bsds500" / split).glob("*.jpg")):
            link = folder / f"{split}-{f.name}"
            if not link.exists():
                link.symlink_to(f)
    return folder


def sdvae_bin() -> str:
    return str(Path(sys.executable).with_name("sdvae"))


def train_sdvae(config: str, overrides: list[str], minutes: float, data: Path, out: Path, vgg: Path | None) -> dict:
    perceptual = [f"lpips_vgg_weights={vgg}"] if vgg else ["perceptual_weight=0"]  # else the config's weight
    command = [sdvae_bin(), "train", "--config", config, f"data={data}", *perceptual, f"max_minutes={minutes}",
               f"output_dir={out}", *overrides]
    start = time.time()
    subprocess.run(command, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return dict(command=" ".join(command[1:]), wall_seconds=round(time.time() - start, 1), steps=metrics["steps"],
                images_per_sec=metrics["images_per_sec"],
                seconds_per_step=round(metrics["wall_seconds"] / max(metrics["steps"], 1), 3)
                if metrics.get("wall_seconds") else None)


EXAMPLE_ROW = "diffusers train_autoencoderkl.py (lr 1e-4, MSE)"
EXAMPLE_FLAGS = ["--resolution", "128", "--train_batch_size", "8", "--learning_rate", "1e-4", "--rec_loss", "l2",
                 "--seed", "0", "--max_train_steps", "1000000", "--checkpointing_steps", "1000000",
                 "--report_to", "aim"]  # aim is not installed: no tracker (its tensorboard one fails on its own config)


def train_example(script: Path, minutes: float, data: Path, work: Path, vgg: Path | None) -> dict:
    """The diffusers example, unchanged, on the `tiny` architecture; LPIPS under its no_grad either way."""
    from diffusers import AutoencoderKL

    from sdvae.presets import preset_config

    AutoencoderKL(**preset_config("tiny")).save_config(work / "tiny-config")
    out = work / "example"
    validation = sorted((DATA / "bsds500" / "val").glob("*.jpg"))[0]  # it logs one image; held out anyway
    command = [sys.executable, str(ROOT / "eval" / "diffusers_example.py"), str(script), "--minutes", str(minutes),
               "--out", str(out), *(["--lpips-vgg-weights", str(vgg)] if vgg else []),
               "--", "--model_config_name_or_path", str(work / "tiny-config"),
               "--train_data_dir", str(data), "--validation_image", str(validation),
               "--perceptual_scale", "0.5" if vgg else "0", *EXAMPLE_FLAGS]
    subprocess.run(command, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    run = json.loads((out / "example_run.json").read_text())
    return dict(command=" ".join(command[1:]), steps=run["steps"], wall_seconds=round(run["wall_seconds"], 1),
                seconds_per_step=round(run["wall_seconds"] / max(run["steps"], 1), 3)), out


def score(vae: Path, work: Path, name: str, sets: list[str]) -> dict:
    scores = {}
    for label in sets:
        folder, flags = SETS[label]
        out = work / "eval" / name / label.replace(" ", "-")
        subprocess.run([sdvae_bin(), "eval", "--vae", f"{name}={vae}", "--data", str(DATA / folder), "--out", str(out),
                        "--no-download", "--no-fid", *flags], check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "metrics.json").read_text())["vaes"][name]
        scores[label] = dict(psnr=round(summary["psnr_mean"], 3), ssim=round(summary["ssim_mean"], 4))
    return scores


def write_table(rows: dict, results: Path) -> None:
    sets = [s for s in SETS if any(s in r.get("scores", {}) for r in rows.values())]
    lines = ["# Quality at equal wall time: CPU, 2 cores, fp32", "",
             "`python eval/bench_quality.py` (see its docstring). Training on BSDS500 train + test (400 photos), "
             "`perceptual_weight=0`; PSNR (dB) / SSIM of the export, posterior mode, 8 bits.", "",
             "| trainer | minutes | steps | s/step | " + " | ".join(sets) + " |",
             "|---|---:|---:|---:|" + "---|" * len(sets)]
    for name, r in rows.items():
        if "skipped" in r:
            lines.append(f"| {name} | | | | skipped: {r['skipped']} |" + " |" * (len(sets) - 1))
            continue
        cells = " | ".join(f"{r['scores'][s]['psnr']:.2f} / {r['scores'][s]['ssim']:.3f}" if s in r["scores"] else ""
                           for s in sets)
        lines.append(f"| {name} | {r['minutes']:g} | {r['steps']} | {r['seconds_per_step']} | {cells} |")
    lines += ["", "Commands:", ""] + [f"- {name}: `{r['command']}`" for name, r in rows.items() if "command" in r]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")


def save(rows: dict, results: Path) -> None:
    results.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    write_table(rows, results)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--config", default=str(ROOT / "train" / "configs" / "tiny.yaml"))
    parser.add_argument("--name", default="sdvae tiny.yaml defaults", help="the row's name")
    parser.add_argument("--diffusers-example", type=Path, default=os.environ.get("DIFFUSERS_EXAMPLE"),
                        help="a copy of diffusers' examples/research_projects/autoencoderkl/train_autoencoderkl.py")
    parser.add_argument("--only-example", action="store_true", help="run the peer's row alone")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS), metavar="SET",
                        help=f"score on these ({', '.join(repr(s) for s in SETS)})")
    parser.add_argument("--results", default="bench_quality_cpu", help="the table's name in eval/results/ "
                        "(screening runs: bench_quality_screen_cpu)")
    parser.add_argument("--lpips-vgg-weights", type=Path, default=None,
                        help="VGG16 ImageNet weights: both trainers also run with their perceptual term")
    parser.add_argument("overrides", nargs="*", help="key=value settings for the sdvae run")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"the image sets are not at {DATA}")
    work = Path(tempfile.mkdtemp(prefix="sdvae-quality-"))
    data = training_folder(work)
    results = ROOT / "eval" / "results" / args.results
    rows_file = results.with_suffix(".json")
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else {}

    vgg = args.lpips_vgg_weights or (vgg16_cache_path() if vgg16_cache_path().is_file() else None)
    for suffix, weights in [("", None)] + ([(" + LPIPS", vgg)] if vgg else []):
        if not args.only_example:
            out = work / f"sdvae{suffix.strip(' +')}"
            row = train_sdvae(args.config, args.overrides, args.minutes, data, out, weights)
            rows[args.name + suffix] = dict(row, minutes=args.minutes, scores=score(out, work, "sdvae", args.sets))
            save(rows, results)
        if args.diffusers_example is None or not Path(args.diffusers_example).is_file():
            where = args.diffusers_example or "pass --diffusers-example PATH"
            rows.setdefault(EXAMPLE_ROW + suffix, dict(skipped=f"no copy of the script ({where}); it is not in "
                                                              f"the diffusers package"))
        else:
            row, out = train_example(Path(args.diffusers_example), args.minutes, data, work / f"ex{suffix.strip(' +')}",
                                     weights)
            rows[EXAMPLE_ROW + suffix] = dict(row, minutes=args.minutes, scores=score(out, work, "example", args.sets))
        save(rows, results)
    if not vgg:
        rows["both with the perceptual term"] = dict(skipped=f"no VGG16 ImageNet weights for LPIPS (looked in "
                                                             f"{vgg16_cache_path()}; or pass --lpips-vgg-weights)")
        save(rows, results)
    print(results.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
