"""The reconstruction / diffusability trade-off on this CPU (`eval/results/diffusion_ready_cpu.md`).

Three VAEs trained from scratch with `tiny.yaml` for the same number of steps on BSDS500 train at 128 px: `tiny`
(4 channels), `tiny` with EQ-VAE's equivariance term, and `tiny-16ch` (the SD3 / FLUX layout). Each is scored by
`sdvae eval` (Kodak and BSDS500 val, 256 px centre crops) and all three by one `sdvae probe` (BSDS500, 128 px).

    python eval/diffusion_ready.py --work /tmp/diffusion-ready          # about an hour on 2 CPU cores

Finished runs, evaluations and probed VAEs in --work are reused, so a killed script continues where it stopped.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
RUNS = {  # name: overrides of train/configs/tiny.yaml
    "tiny": [],
    "tiny-eq": ["equivariance_weight=1.0", "equivariance_prob=0.5", "equivariance_scales=0.25,1.0",
                "equivariance_rotate=true"],
    "tiny-16ch": ["model=tiny-16ch"],
}
SETS = {"Kodak": DATA / "kodak", "BSDS500 val": DATA / "bsds500" / "val"}
PROBE_FILES = ("table.md", "metrics.json", "spectrum.png", "probe_loss.png", "samples.png", "equivariance.png")


def sdvae(*args: str) -> None:
    print("$ sdvae " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "sdvae", *args], check=True)


def train_all(work: Path, steps: int) -> dict:
    trained = {}
    for name, overrides in RUNS.items():
        out = work / "runs" / name
        if not (out / "metrics.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # an unfinished run is trained again from the start
            sdvae("train", "--config", str(ROOT / "train/configs/tiny.yaml"), f"data={DATA / 'bsds500/train'}",
                  f"val_data={DATA / 'bsds500/val'}", "perceptual_weight=0", f"max_steps={steps}",
                  f"output_dir={out}", *overrides)  # no VGG16 weights offline: MSE only
        trained[name] = json.loads((out / "metrics.json").read_text())
    return trained


def evaluate_all(work: Path) -> dict:
    scores = {}
    for label, data in SETS.items():
        out = work / "eval" / data.name
        if not (out / "metrics.json").is_file():
            vaes = [f"--vae={name}={work / 'runs' / name}" for name in RUNS]
            sdvae("eval", *vaes, "--data", str(data), "--out", str(out), "--resolution", "256", "--no-download")
        scores[label] = json.loads((out / "metrics.json").read_text())
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="runs, evaluations and the probe's caches go here")
    parser.add_argument("--steps", type=int, default=1200, help="training steps of each VAE (default 1200)")
    parser.add_argument("--probe-steps", type=int, default=1500, help="denoiser steps per VAE (default 1500)")
    parser.add_argument("--results", default=str(ROOT / "eval" / "results" / "diffusion_ready_cpu"))
    args = parser.parse_args()
    if not (DATA / "bsds500").is_dir() or not (DATA / "kodak").is_dir():
        raise SystemExit(f"BSDS500 and Kodak are needed in {DATA}")
    work, results = Path(args.work), Path(args.results)
    start = time.time()
    trained = train_all(work, args.steps)
    scores = evaluate_all(work)
    probe_out = work / "probe"
    sdvae("probe", *[f"--vae={name}={work / 'runs' / name}" for name in RUNS], "--data", str(DATA / "bsds500/train"),
          "--val-data", str(DATA / "bsds500/val"), "--out", str(probe_out), "--resolution", "128",
          "--steps", str(args.probe_steps), "--no-fid")
    results.mkdir(parents=True, exist_ok=True)
    for name in PROBE_FILES:
        shutil.copyfile(probe_out / name, results / f"probe_{name}")
    probed = json.loads((probe_out / "metrics.json").read_text())
    summary = dict(steps=args.steps, probe_steps=args.probe_steps, seconds=round(time.time() - start), runs=trained,
                   eval={label: s["vaes"] for label, s in scores.items()})
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results.parent / "diffusion_ready_cpu.md").write_text(table(trained, scores, probed, args))
    print(f"written {results.parent / 'diffusion_ready_cpu.md'} and {results}/")


def mean(values: list) -> float:
    return sum(values) / len(values)


def table(trained: dict, scores: dict, probed: dict, args) -> str:
    lines = [f"# Latents for diffusion: three tiny VAEs at the same budget (CPU)\n",
             f"`python eval/diffusion_ready.py --steps {args.steps} --probe-steps {args.probe_steps}`: each VAE trained "
             f"{args.steps} steps of `train/configs/tiny.yaml` (batch 2, MSE, 128 px, `perceptual_weight=0`) on "
             f"BSDS500 train; 2 CPU cores, fp32.\n",
             "| VAE | latent ch | train min | s/step | scaling / shift (measured) | Kodak PSNR / SSIM | BSDS500 val "
             "PSNR / SSIM | held-out loss | HF energy | downscale PSNR (gap) | rotate PSNR (gap) | in use |",
             "|---|---:|---:|---:|---|---|---|---:|---:|---|---|---:|"]
    for name in RUNS:
        run, p = trained[name], probed["vaes"][name]
        f = run["latent_factors"]
        shift = f"{f['shift_factor']:+.4f}" if f.get("shift_factor") is not None else "—"
        cells = [f"{scores[label]['vaes'][name]['psnr_mean']:.2f} / {scores[label]['vaes'][name]['ssim_mean']:.4f}" for label in SETS]
        eq = {k: {m: mean(v) for m, v in d.items()} for k, d in p["equivariance"].items()}
        lines.append(
            f"| {name} | {p['latent_channels']} | {run['wall_seconds'] / 60:.1f} | "
            f"{run['wall_seconds'] / run['steps']:.2f} | {f['scaling_factor']:.4f} / {shift} | {cells[0]} | {cells[1]} | "
            f"{p['probe']['heldout_loss']:.4f} | {p['spectrum']['high_frequency_fraction']:.3f} | "
            f"{eq['downscale_2x']['psnr']:.2f} ({eq['downscale_2x']['gap']:+.2f}) | "
            f"{eq['rotate_90']['psnr']:.2f} ({eq['rotate_90']['gap']:+.2f}) | {p['statistics']['channels_in_use']} |")
    lines += ["", "The probe's own table, with the paired comparisons (`diffusion_ready_cpu/probe_table.md`):", "",
              (Path(args.results) / "probe_table.md").read_text()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
