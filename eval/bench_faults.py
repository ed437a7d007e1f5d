"""What the training run's fault handling costs, on the tiny preset at 128 px (batch 8, scikit-image's photos).

1. Per step: the exact non-finite weight check (one max-abs norm per trained tensor) and the copy that lets a
   bad update be undone (weights + Adam state), timed inside real training steps.
2. Ctrl-C: seconds from SIGINT (sent to the process group, as a terminal does) to the exit with its checkpoint.

    python eval/bench_faults.py            # writes eval/results/bench_faults_<device>.{md,json}
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdvae import train as training  # noqa: E402
from sdvae.config import load_config  # noqa: E402
from sdvae.demo import prepare_data  # noqa: E402

SETTINGS = dict(model="tiny", resolution=128, batch_size=8, perceptual_weight=0.0, num_workers=0, preview_images=0,
                learning_rate=1e-5, log_every=10**9, sample_every=10**9, checkpoint_every=10**9)


def timed(method, totals: dict, key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
    return wrapper


def guard_cost(data: Path, work: Path, steps: int) -> dict:
    totals: dict = {}
    guard = training.StepGuard
    guard.finite, guard.save = timed(guard.finite, totals, "check"), timed(guard.save, totals, "copy")
    training.train(load_config(overrides=dict(SETTINGS, data=str(data), max_steps=2, output_dir=str(work / "w"))))
    totals.clear()  # warm-up run above: first-step allocations
    start = time.perf_counter()
    metrics = training.train(load_config(overrides=dict(SETTINGS, data=str(data), max_steps=steps,
                                                        output_dir=str(work / "guard"))))
    step = (time.perf_counter() - start) / metrics["steps"]  # includes the export: an upper bound on a step
    check, copy = totals["check"] / steps, totals["copy"] / steps
    return dict(steps=steps, seconds_per_step=round(step, 4), check_ms=round(check * 1e3, 3),
                copy_ms=round(copy * 1e3, 3), check_percent=round(100 * check / step, 3),
                copy_percent=round(100 * copy / step, 3))


def sigint_to_exit(data: Path, work: Path, tries: int) -> list[dict]:
    rows = []
    for i in range(tries):
        out = work / f"sigint-{i}"
        settings = [f"{k}={v}" for k, v in dict(SETTINGS, data=str(data), max_steps=10**6, checkpoint_every=4,
                                                 output_dir=str(out)).items()]
        proc = subprocess.Popen([sys.executable, "-m", "sdvae", "train", *settings], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        while not (out / "checkpoint-4" / "trainer_state.json").exists():
            time.sleep(0.05)
        time.sleep(1.0)  # mid-step, not just after a checkpoint
        sent = time.perf_counter()
        os.killpg(proc.pid, signal.SIGINT)
        stderr = proc.communicate()[1]
        seconds = time.perf_counter() - sent
        last = stderr.strip().splitlines()[-1]
        rows.append(dict(exit_code=proc.returncode, seconds=round(seconds, 2), message=last))
        print(rows[-1], flush=True)
    return rows


def main():
    device = f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    work = Path(tempfile.mkdtemp(prefix="sdvae-faults-"))
    data, _ = prepare_data(work / "data", 256)
    guard = guard_cost(data, work, steps=20)
    print(guard, flush=True)
    interrupts = sigint_to_exit(data, work, tries=3)
    out = Path(__file__).parent / "results" / "bench_faults_cpu"
    lines = [f"# Fault handling cost: {device}\n",
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Command: `python eval/bench_faults.py`. "
             f"tiny preset, 128 px, batch 8, fp32, reconstruction + KL.\n",
             "| per optimiser step | ms | % of a step |", "|---|---:|---:|",
             f"| training step (whole, mean of {guard['steps']}) | {guard['seconds_per_step'] * 1e3:.0f} | 100 |",
             f"| non-finite weight check | {guard['check_ms']:.2f} | {guard['check_percent']:.2f} |",
             f"| copy kept to undo a bad update | {guard['copy_ms']:.2f} | {guard['copy_percent']:.2f} |", "",
             "| SIGINT to exit (with its checkpoint) | exit code | seconds |", "|---|---:|---:|"]
    lines += [f"| try {i + 1} | {r['exit_code']} | {r['seconds']:.2f} |" for i, r in enumerate(interrupts)]
    lines += ["", f"Last line printed: `{interrupts[-1]['message']}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(device=device, guard=guard, sigint=interrupts), indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
