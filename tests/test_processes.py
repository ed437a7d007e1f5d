"""Several processes (gloo on CPU) and runs killed with SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REAL_PHOTOS, write_photos

pytestmark = pytest.mark.slow  # every test here trains, probes or starts processes

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
COMMON = ["resolution=32", "sample_posterior=false", "perceptual_weight=0", "num_workers=0", "learning_rate=1e-3",
          "adam_beta1=0.9", "adam_beta2=0.99", "checkpoint_every=2", "log_every=1", "max_grad_norm=0"]


def run(args, **kw):
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """2 processes x batch 2 == 1 process x batch 4: each process reads its own half of the same batches, and
    DDP averages the gradients (a process reading the other's data, or an unsynchronised one, changes them)."""
    data = write_photos(tmp_path / "photos", size=48, names=REAL_PHOTOS + ("retina", "hubble_deep_field"))
    settings = COMMON + [f"data={data}", "max_steps=2"]
    run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "-m", "sdvae", "train", *settings, "batch_size=2",
         f"output_dir={tmp_path / 'two'}"])
    run([sys.executable, "-m", "sdvae", "train", *settings, "batch_size=4", f"output_dir={tmp_path / 'one'}"])
    two, one = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("two", "one"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["images_seen"] == one["images_seen"] == 8
    for logged in ("first_logged", "last_logged"):  # grad norm of the all-reduced gradient, steps 1 and 2
        assert two[logged]["grad_norm"] == pytest.approx(one[logged]["grad_norm"], rel=1e-4)
    a = load_file(tmp_path / "one" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "two" / "vae" / "diffusion_pytorch_model.safetensors")
    # Adam's first steps are ~lr * sign(grad): float noise in near-zero gradients moves weights by at most 2 * lr
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2 * 2e-3
    writers = {p.name.split(".")[-2] for p in (tmp_path / "two" / "logs").rglob("events.out.tfevents*")}
    assert len(writers) == 1  # one process (pid in the file name) writes the logs
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-2"]


def test_killed_run_resumes_exactly(tmp_path):
    """kill -9 mid-run, --resume latest: the result equals an uninterrupted run's, bit for bit."""
    data = write_photos(tmp_path / "photos", size=48)
    settings = [*COMMON, f"data={data}", "batch_size=2", "sample_posterior=true", "disc_weight=0.5",
                "disc_start=3", "ema_decay=0.9", "learn_logvar=true"]
    run([sys.executable, "-m", "sdvae", "train", *settings, "max_steps=12", f"output_dir={tmp_path / 'straight'}"])

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sdvae", "train", *settings, "max_steps=1000",
                             f"output_dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint-6" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert done and done[-1] >= 6
    for later in killed.glob("checkpoint-*"):  # resume from step 6 whatever else was written before the kill
        if int(later.name.split("-")[1]) > 6:
            os.rename(later, killed / f"ignored-{later.name}")
    run([sys.executable, "-m", "sdvae", "train", *settings, "max_steps=12", f"output_dir={killed}",
         "--resume", "latest"])
    a = load_file(tmp_path / "straight" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(killed / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    s, k = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "straight", killed))
    assert s["last_logged"]["loss"] == k["last_logged"]["loss"]
    assert s["last_logged"]["d_loss"] == k["last_logged"]["d_loss"]
