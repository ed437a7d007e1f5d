"""Quality per hour of compute: train for a fixed wall time, then score on photos no run trained on.

    python eval/bench_quality.py                               # sdvae's tiny defaults, 10 minutes on this CPU
    python eval/bench_quality.py --minutes 10 --name lr1e-3 learning_rate=1e-3 resolution=64   # a recipe variant

Training data: BSDS500 train + test (400 photos, `../shared/data`). Each trainer runs `--minutes` of wall time with
`perceptual_weight=0` (no VGG weights offline), then `sdvae eval` scores the export on Kodak at 256 px (shorter side
resized, centre crop), Kodak at full size and BSDS500 val at 256 px. Rows are added to (or replaced in)
eval/results/bench_quality_cpu.json, and the table eval/results/bench_quality_cpu.md is written from it.

The diffusers example (`train_autoencoderkl.py`) is not part of the diffusers package and is not run yet: its row
says so (issue 15).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "eval" / "results" / "bench_quality_cpu"
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


def train_sdvae(config: str, overrides: list[str], minutes: float, data: Path, out: Path) -> dict:
    command = [sdvae_bin(), "train", "--config", config, f"data={data}", "perceptual_weight=0",
               f"max_minutes={minutes}", f"output_dir={out}", *overrides]
    start = time.time()
    subprocess.run(command, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return dict(command=" ".join(command[1:]), wall_seconds=round(time.time() - start, 1), steps=metrics["steps"],
                images_per_sec=metrics["images_per_sec"],
                seconds_per_step=round(metrics["wall_seconds"] / max(metrics["steps"], 1), 3)
                if metrics.get("wall_seconds") else None)


def score(vae: Path, work: Path, name: str) -> dict:
    scores = {}
    for label, (folder, flags) in SETS.items():
        out = work / "eval" / name / label.replace(" ", "-")
        subprocess.run([sdvae_bin(), "eval", "--vae", f"{name}={vae}", "--data", str(DATA / folder), "--out", str(out),
                        "--no-download", "--no-fid", *flags], check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "metrics.json").read_text())["vaes"][name]
        scores[label] = dict(psnr=round(summary["psnr_mean"], 3), ssim=round(summary["ssim_mean"], 4))
    return scores


def write_table(rows: dict) -> None:
    lines = ["# Quality at equal wall time: CPU, 2 cores, fp32", "",
             "`python eval/bench_quality.py` (see its docstring). Training on BSDS500 train + test (400 photos), "
             "`perceptual_weight=0`; PSNR (dB) / SSIM of the export, posterior mode, 8 bits.", "",
             "| trainer | minutes | steps | s/step | " + " | ".join(SETS) + " |",
             "|---|---:|---:|---:|" + "---|" * len(SETS)]
    for name, r in rows.items():
        if "skipped" in r:
            lines.append(f"| {name} | | | | skipped: {r['skipped']} |" + " |" * (len(SETS) - 1))
            continue
        cells = " | ".join(f"{r['scores'][s]['psnr']:.2f} / {r['scores'][s]['ssim']:.3f}" for s in SETS)
        lines.append(f"| {name} | {r['minutes']:g} | {r['steps']} | {r['seconds_per_step']} | {cells} |")
    lines += ["", "Commands:", ""] + [f"- {name}: `{r['command']}`" for name, r in rows.items() if "command" in r]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--config", default=str(ROOT / "train" / "configs" / "tiny.yaml"))
    parser.add_argument("--name", default="sdvae tiny.yaml defaults", help="the row's name")
    parser.add_argument("overrides", nargs="*", help="key=value settings for the sdvae run")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"the image sets are not at {DATA}")
    work = Path(tempfile.mkdtemp(prefix="sdvae-quality-"))
    data = training_folder(work)
    rows_file = RESULTS.with_suffix(".json")
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else {}

    row = train_sdvae(args.config, args.overrides, args.minutes, data, work / "sdvae")
    rows[args.name] = dict(row, minutes=args.minutes, scores=score(work / "sdvae", work, "sdvae"))
    rows.setdefault("diffusers train_autoencoderkl.py", dict(skipped="not run yet: the script is not in the diffusers "
                                                                     "package (issue 15)"))
    rows_file.write_text(json.dumps(rows, indent=1) + "\n")
    write_table(rows)
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
