"""A tiny preview VAE distilled on this CPU, against its teacher (`eval/results/distill_cpu.md`).

    python eval/distill.py --teacher RUN_OR_VAE --work /tmp/distill --minutes 10

1. Distils `taesd-16` (train/configs/distill-tiny.yaml, batch --batch-size) from the teacher on BSDS500 train at
   128 px for --minutes; a finished run in --work is reused.
2. Decode cost of one 512x512 image in fp32 on this CPU: multiply-accumulates (torch.utils.flop_counter) and the
   median wall time, student against teacher; and TAESD's own widths (`taesd`) against `sd-kl-f8`, with random
   weights (the cost does not depend on them).
3. Quality on Kodak and BSDS500 val (256 px centre crops): PSNR of the student decoding the teacher's latents,
   against the image and against the teacher's own reconstruction, and of the student's encode + decode.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
SETS = {"Kodak": DATA / "kodak", "BSDS500 val": DATA / "bsds500" / "val"}

from sdvae.models import build_student, teacher_latents  # noqa: E402
from sdvae.evaluate import batches, image_sources  # noqa: E402
from sdvae.images import pixels_to_tensor  # noqa: E402
from sdvae.metrics import psnr_batch  # noqa: E402
from sdvae.images import to_uint8  # noqa: E402
from sdvae.models import build_vae, count_parameters  # noqa: E402
from sdvae.sources import load_pretrained_vae  # noqa: E402


def distil(teacher: str, out: Path, minutes: float, batch_size: int) -> dict:
    if not (out / "metrics.json").is_file():
        command = [sys.executable, "-m", "sdvae", "train", "--config", str(ROOT / "train/configs/distill-tiny.yaml"),
                   f"teacher={teacher}", "model=taesd-16", f"data={DATA / 'bsds500/train'}",
                   f"val_data={DATA / 'bsds500/val'}", "resolution=128", f"batch_size={batch_size}",
                   "perceptual_weight=0",  # no VGG16 weights offline
                   f"max_minutes={minutes}", f"output_dir={out}", "sample_every=500", "checkpoint_every=500"]
        print("$ " + " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    return json.loads((out / "metrics.json").read_text())


@torch.no_grad()
def decode_cost(vae, channels: int, side: int = 512, repeats: int = 3) -> dict:
    vae = vae.eval().to(memory_format=torch.channels_last)
    z = torch.randn(1, channels, side // 8, side // 8).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        vae.decode(z)
    vae.decode(z)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        vae.decode(z)
        seconds.append(time.perf_counter() - start)
    return dict(gmacs=counter.get_total_flops() / 2e9, seconds=statistics.median(seconds),
                decoder_parameters=count_parameters(vae.decoder))


def psnr(a: torch.Tensor, b: torch.Tensor) -> list:
    return psnr_batch(to_uint8(a), to_uint8(b)).tolist()


@torch.no_grad()
def quality(teacher, student, data: Path) -> dict:
    values = {k: [] for k in ("teacher", "student_decoder", "student_vs_teacher", "student_round_trip")}
    total, sources = image_sources(str(data))
    for _, pixels in batches(sources, 256, False, 8, None, []):
        x = pixels_to_tensor(pixels)
        reconstruction = teacher.decode(teacher.encode(x).latent_dist.mode()).sample
        scaled, _ = teacher_latents(teacher, x, None)
        decoded = student.decode(scaled).sample
        values["teacher"] += psnr(x, reconstruction)
        values["student_decoder"] += psnr(x, decoded)
        values["student_vs_teacher"] += psnr(reconstruction, decoded)
        values["student_round_trip"] += psnr(x, student.decode(student.encode(x).latents).sample)
    return dict(images=len(values["teacher"]), **{k: statistics.mean(v) for k, v in values.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the KL VAE to distil (a run folder, diffusers folder, file)")
    parser.add_argument("--work", required=True, help="the student's run folder goes here")
    parser.add_argument("--minutes", type=float, default=10.0, help="distillation budget (default 10)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="TAESD's 16 is for GPUs; on 2 CPU cores more, smaller steps fit the budget (default 4)")
    parser.add_argument("--results", default=str(ROOT / "eval" / "results" / "distill_cpu"))
    args = parser.parse_args()
    if not all(p.is_dir() for p in SETS.values()):
        raise SystemExit(f"Kodak and BSDS500 are needed in {DATA}")
    torch.manual_seed(0)
    run = distil(args.teacher, Path(args.work) / "student", args.minutes, args.batch_size)
    teacher = load_pretrained_vae(args.teacher).eval()
    student = load_pretrained_vae(run["export"]).eval()
    channels = teacher.config.latent_channels
    cost = {"teacher": decode_cost(teacher, channels), "student": decode_cost(student, channels)}
    sd = build_vae("sd-kl-f8")
    cost.update({"sd-kl-f8": decode_cost(sd, 4, repeats=2), "taesd": decode_cost(build_student("taesd", sd), 4)})
    scores = {label: quality(teacher, student, data) for label, data in SETS.items()}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    summary = dict(teacher=args.teacher, minutes=args.minutes, batch_size=args.batch_size, run={k: run[k] for k in (
        "steps", "wall_seconds", "images_per_sec", "images_seen", "validation")}, decode_512=cost, quality=scores,
        torch_threads=torch.get_num_threads())
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results.parent / "distill_cpu.md").write_text(table(summary))
    print(f"written {results.parent / 'distill_cpu.md'} and {results}/summary.json")


def table(s: dict) -> str:
    c, run = s["decode_512"], s["run"]
    lines = [
        "# A tiny preview VAE distilled on this CPU\n",
        f"`python eval/distill.py --teacher {s['teacher']} --minutes {s['minutes']:g} --batch-size {s['batch_size']}`: `taesd-16` "
        f"(`train/configs/distill-tiny.yaml`, batch {s['batch_size']}, 128 px, MSE, `perceptual_weight=0`) distilled from the teacher "
        f"on BSDS500 train: {run['steps']} steps in {run['wall_seconds'] / 60:.1f} min "
        f"({run['images_per_sec']:.1f} images/s), 2 CPU cores, fp32.\n",
        "## Decode cost, one 512x512 image, fp32, channels-last, this CPU\n",
        "| decoder | parameters | GMACs | x fewer | seconds (median) | x faster |", "|---|---:|---:|---:|---:|---:|"]
    for big, small in (("teacher", "student"), ("sd-kl-f8", "taesd")):
        for name in (big, small):
            ratio = c[big]["gmacs"] / c[name]["gmacs"], c[big]["seconds"] / c[name]["seconds"]
            lines.append(f"| {name} | {c[name]['decoder_parameters']:,} | {c[name]['gmacs']:.1f} | {ratio[0]:.1f} | "
                         f"{c[name]['seconds']:.3f} | {ratio[1]:.1f} |")
    lines += ["", "The teacher / student rows are the pair trained here; `sd-kl-f8` / `taesd` are the full-size "
              "architectures with random weights (TAESD's widths against the SD VAE's).", "",
              "## Quality, 256 px centre crops (mean PSNR, dB)\n",
              "| set | images | teacher (its reconstruction) | student decoding the teacher's latents | the same, "
              "against the teacher's reconstruction | student encode + decode |", "|---|---:|---:|---:|---:|---:|"]
    for label, q in s["quality"].items():
        lines.append(f"| {label} | {q['images']} | {q['teacher']:.2f} | {q['student_decoder']:.2f} | "
                     f"{q['student_vs_teacher']:.2f} | {q['student_round_trip']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
