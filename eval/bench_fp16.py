"""fp16 against fp32 decode of a VAE that overflows fp16, before and after `sdvae fp16-fix`'s exact rescaling.

The VAE: the SD architecture (sd-kl-f8, random init) with its decoder's residual stream scaled up until the fp16
decode overflows, while its fp32 output stays that of the base (sdvae.fp16.overflowing_vae's "residual" kind). Rows: decode seconds per image (median of --repeats after a warm-up), the ratio to
fp32 in the same run, peak memory, and whether the output is finite and how far
(8-bit levels) from the original's fp32 decode. Each row runs in a process of its own, so that peak memory on the
CPU (resident size above the loaded model's, sampled every 2 ms) is that row's alone; on a GPU it is torch.cuda.max_memory_allocated.

    python eval/bench_fp16.py                        # CPU, 256 px: eval/results/bench_fp16_cpu.{md,json}
    python eval/bench_fp16.py --device cuda --sizes 512 1024 --out $OUT/bench_fp16_cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdvae.fp16 import LEVELS, overflowing_vae, rescale_exact  # noqa: E402
from sdvae.models import build_vae  # noqa: E402

ROWS = {  # name: (which VAE, dtype)
    "original fp32": ("original", torch.float32),
    "original fp16": ("original", torch.float16),
    "fixed fp16": ("fixed", torch.float16),
    "fixed fp32": ("fixed", torch.float32),
}


def build(folder: Path) -> None:
    """The overflowing SD-architecture VAE and its exactly rescaled copy, saved for the row processes."""
    original = overflowing_vae("residual", base=build_vae("sd-kl-f8").eval())
    fixed, info = rescale_exact(original)
    original.save_pretrained(folder / "original")
    fixed.save_pretrained(folder / "fixed")
    (folder / "rescale.json").write_text(json.dumps(dict(largest_before=info["largest_before"],
                                                         largest_after=info["largest_after"],
                                                         fp32_diff_levels=info["fp32_diff_levels"])))


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """The largest resident size while it runs, sampled every 2 ms (max RSS would keep the load's peak instead)."""

    def __init__(self):
        self.peak, self.running = 0, False

    def start(self):
        self.running, self.thread = True, threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, resident_bytes())


@torch.no_grad()
def row(folder: Path, name: str, size: int, repeats: int, device: str) -> dict:
    """One row, in this process: decode `repeats` times after a warm-up; the reference is the original's fp32."""
    from diffusers import AutoencoderKL

    which, dtype = ROWS[name]
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)) / 0.18215
    reference = torch.load(folder / f"reference-{size}.pt", weights_only=True)
    vae = AutoencoderKL.from_pretrained(folder / which).eval()
    vae = (vae.half() if dtype == torch.float16 else vae).to(device)
    z = latents.to(device, dtype)
    baseline = resident_bytes()  # the loaded model's: the decode's comes on top
    sampler = PeakSampler().start()
    vae.decode(z)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decoded = vae.decode(z).sample
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else sampler.stop() - baseline
    decoded = decoded.float().cpu()
    finite = bool(decoded.isfinite().all())
    levels = float((decoded - reference).abs().nan_to_num(float("inf")).max()) * LEVELS
    return dict(row=name, size=size, seconds=statistics.median(times), peak_mb=peak / 2**20, finite=finite,
                levels=levels)


@torch.no_grad()
def write_reference(folder: Path, size: int) -> None:
    from diffusers import AutoencoderKL

    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)) / 0.18215
    vae = AutoencoderKL.from_pretrained(folder / "original").eval()
    torch.save(vae.decode(latents).sample, folder / f"reference-{size}.pt")


def run_row(folder: Path, name: str, size: int, repeats: int, device: str, limit: float) -> dict:
    """The row from its own process; one that runs past `limit` seconds (fp16 on a CPU without native fp16) is
    stopped and reported as taking longer than that."""
    try:
        result = subprocess.run([sys.executable, __file__, "--row", name, "--folder", str(folder), "--sizes",
                                 str(size), "--repeats", str(repeats), "--device", device], capture_output=True,
                                text=True, check=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return dict(row=name, size=size, seconds=None, limit=limit, decodes=repeats + 1, peak_mb=None, finite=None,
                    levels=None)
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict], device: str) -> str:
    lines = ["| size | row | decode s/image | vs fp32 | peak memory (MB) | finite | max diff to original fp32 (levels) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["size"] == r["size"] and x["row"] == "original fp32")["seconds"]
        if r["seconds"] is None:  # stopped at the limit: warm-up and repeats together took longer
            per_decode = r["limit"] / r["decodes"]  # at least, for each of the warm-up and the repeats
            lines.append(f"| {r['size']} | {r['row']} | > {per_decode:.3g} ({r['decodes']} decodes not done in "
                         f"{r['limit']:g} s) | > {per_decode / base:.0f}x | - | - | - |")
            continue
        levels = f"{r['levels']:.3g}" if r["finite"] else "-"
        lines.append(f"| {r['size']} | {r['row']} | {r['seconds']:.3g} | {r['seconds'] / base:.2f}x | "
                     f"{r['peak_mb']:.0f} | {'yes' if r['finite'] else 'NO (NaN/inf)'} | {levels} |")
    memory = "resident size above the loaded model's, sampled every 2 ms" if device == "cpu" else "torch.cuda.max_memory_allocated"
    return "\n".join(lines) + f"\n\nPeak memory: {memory}.\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row-limit", type=float, default=600, help="seconds a row may take (default 600)")
    parser.add_argument("--out", default=None, help="path stem of the .md/.json (default eval/results/bench_fp16_DEVICE)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(row(Path(args.folder), args.row, args.sizes[0], args.repeats, args.device)))
        return
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_fp16_{args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder)
        rescale = json.loads((folder / "rescale.json").read_text())
        rows = []
        for size in args.sizes:
            write_reference(folder, size)
            for name in ROWS:
                rows.append(run_row(folder, name, size, args.repeats, args.device, args.row_limit))
                print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'} " \
        f"({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    text = (f"# fp16 against fp32 decode of an overflowing SD-architecture VAE, before and after fp16-fix\n\n"
            f"Device: {device}; torch {torch.__version__}; `python eval/bench_fp16.py {' '.join(sys.argv[1:])}`.\n"
            f"Largest decoder activation: {rescale['largest_before']['max_abs']:.4g} "
            f"({rescale['largest_before']['name']}) before, {rescale['largest_after']['max_abs']:.4g} after the exact "
            f"rescaling (fp32 output changed by {rescale['fp32_diff_levels']:.2g} levels).\n\n" + table(rows, args.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dict(rows=rows, rescale=rescale, device=device), indent=2))
    print(text)


if __name__ == "__main__":
    main()
