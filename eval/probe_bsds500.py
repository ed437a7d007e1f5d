"""The CPU diffusion-probe table: three tiny VAEs probed on BSDS500 at 128 px (`eval/results/probe_bsds500_cpu/`).

    sdvae train output_dir=runs/demo                                       # the demo VAE (3 minutes)
    sdvae train --config train/configs/tiny.yaml data=../shared/data/bsds500/train \
        val_data=../shared/data/bsds500/val perceptual_weight=0 max_minutes=10 output_dir=runs/bsds-tiny
    python eval/probe_bsds500.py --demo runs/demo --trained runs/bsds-tiny --work /tmp/probe-bsds500

The third VAE is the tiny preset's untrained init (seed 0, as `sdvae train` seeds it). The probe's working folder
(latent caches, denoiser checkpoints) stays in --work; its tables and figures are copied here.
"""
import argparse
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "bsds500"
FILES = ("table.md", "metrics.json", "spectrum.png", "probe_loss.png", "samples.png", "equivariance.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="the demo's run folder")
    parser.add_argument("--trained", required=True, help="the tiny VAE trained 10 minutes on BSDS500")
    parser.add_argument("--work", required=True, help="the probe's working folder (caches, checkpoints)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--results", default=str(ROOT / "eval" / "results" / "probe_bsds500_cpu"))
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"BSDS500 not found at {DATA}")

    from accelerate.utils import set_seed

    from sdvae.models import build_vae
    from sdvae.probe import ProbeSettings, probe

    work = Path(args.work)
    init = work / "tiny-init"
    if not (init / "config.json").is_file():
        set_seed(0)
        build_vae("tiny").save_pretrained(init)
    vaes = {"demo": args.demo, "bsds-10min": args.trained, "init": str(init)}
    settings = ProbeSettings(resolution=128, steps=args.steps, val_data=str(DATA / "val"), device="cpu")
    start = time.time()
    probe(vaes, str(DATA / "train"), str(work / "out"), settings)
    print(f"probe of {len(vaes)} VAEs: {time.time() - start:.0f} s")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(work / "out" / name, results / name)
    print(f"copied {', '.join(FILES)} to {results}")


if __name__ == "__main__":
    main()
