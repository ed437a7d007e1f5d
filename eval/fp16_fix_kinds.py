"""`sdvae fp16-fix` on each VAE built to overflow fp16 (sdvae.fp16.overflowing_vae): the README's before/after table.

Each kind is saved as a diffusers folder and fixed by the command's own code, checked on held-out squares of the
embedded photos; the rows are read from its fp16-report.json.

    python eval/fp16_fix_kinds.py                  # 32 px, 16 squares: eval/results/fp16_fix_kinds.{md,json}
    python eval/fp16_fix_kinds.py --seeds 0 1 2    # more VAEs of each kind
    python eval/fp16_fix_kinds.py --preset sd-kl-f8 --out eval/results/fp16_fix_kinds_sd   # the SD architecture
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdvae.fp16 import LEVELS, OVERFLOW_KINDS, overflowing_vae  # noqa: E402
from sdvae.fp16_fix import fp16_fix_command  # noqa: E402
from sdvae.models import build_vae  # noqa: E402

COLUMNS = ("test VAE", "seed", "largest decoder activation before", "fp16 decode before", "stages", "largest after",
           "fp16 decode after", "SiLU rescaling: aim, fp32 cost (levels)", "max diff to original fp32 (levels)",
           "force_upcast", "encoder bit-identical")


def row(kind: str, seed: int, report: dict) -> dict:
    before, after = report["before"]["largest"]["decoder"], report["after"]["largest"]["decoder"]
    short = before["name"].removeprefix("decoder.")
    silu = report.get("silu_rescale")
    return dict(zip(COLUMNS, (
        f"`{kind}`", seed, f"{before['max_abs']:.3g} (`{short}`)",
        "finite" if report["before"]["decode_finite"] else "NaN/inf", ", ".join(report["stages"]),
        f"{after['max_abs']:.3g}", "finite" if report["after"]["decode_finite"] else "NaN/inf",
        f"{silu['target']:.4g}, {silu['fp32_diff_levels']:.3g}" if silu else "-", f"{report['check']['max_abs_diff'] * LEVELS:.3g}",
        str(report["force_upcast"]).lower(), report["encoder_identical"])))


def seeded_preset(preset: str, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vae(preset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--max-images", type=int, default=16)
    parser.add_argument("--preset", default=None, help="build each kind on this preset's architecture (random "
                        "init) instead of the small test VAE")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fp16_fix_kinds"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for kind in OVERFLOW_KINDS:
            for seed in args.seeds:
                source, out = Path(work) / f"{kind}-{seed}", Path(work) / f"{kind}-{seed}-fixed"
                base = None if args.preset is None else seeded_preset(args.preset, seed)
                overflowing_vae(kind, seed=seed, base=base).save_pretrained(source)
                with contextlib.redirect_stdout(io.StringIO()):
                    report = fp16_fix_command(str(source), out, resolution=args.resolution,
                                              max_images=args.max_images)
                rows.append(row(kind, seed, report))
                print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    preset = f" --preset {args.preset}" if args.preset else ""
    lines = [f"`python eval/fp16_fix_kinds.py --seeds {' '.join(map(str, args.seeds))}{preset}` ({date.today()}, "
             f"{platform.processor() or platform.machine()}; {args.max_images} held-out {args.resolution} px squares)",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"written: {out.with_suffix('.md')}, {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
