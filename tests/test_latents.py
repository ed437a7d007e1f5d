import json
import os
import subprocess
import sys

import pytest
import torch

from sdvae.latents import latent_statistics
from sdvae.models import build_vae
from tests.test_processes import ACCELERATE


@pytest.fixture
def vae_folder(tmp_path):
    torch.manual_seed(0)
    build_vae("tiny").save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_statistics_are_those_of_the_latents(photos, vae_folder):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder)
    stats = latent_statistics(vae, str(photos), resolution=64, sample=False)
    from sdvae.data import build_dataset
    dataset = build_dataset(str(photos), 64, random_flip=False, random_crop=False)
    x = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode().double()
    assert stats["images"] == len(dataset)
    assert stats["std"] == pytest.approx(z.std(unbiased=False).item(), rel=1e-9)
    assert stats["mean"] == pytest.approx(z.mean().item(), rel=1e-9, abs=1e-12)
    assert stats["channel_std"] == pytest.approx(z.transpose(0, 1).reshape(4, -1).std(1, unbiased=False).tolist())
    assert stats["scaling_factor"] == pytest.approx(1 / stats["std"])


@pytest.mark.slow
def test_one_process_equals_two_and_write(tmp_path, photos, vae_folder):
    """Batch size 1, so each image's fp32 latent is computed identically; only the float64 sums' order differs."""
    common = ["-m", "sdvae", "stats", "--vae", str(vae_folder), "--data", str(photos), "--resolution", "32",
              "--batch-size", "1"]
    # one thread as each launched process has (accelerate sets OMP_NUM_THREADS=1): convolutions blocked for other
    # thread counts round differently in fp32
    one = subprocess.run([sys.executable, *common], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    two = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", *common, "--write", "--shift"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads(out.stdout[:out.stdout.rindex("}") + 1]) for out in (one, two))
    assert a["images"] == b["images"] == len(list(photos.iterdir()))
    for key in ("mean", "std", "scaling_factor"):
        assert a[key] == pytest.approx(b[key], rel=1e-6)  # the encoder's fp32 rounding (seen up to 3e-7 under load)
    assert a["channel_std"] == pytest.approx(b["channel_std"], rel=1e-6)
    config = json.loads((vae_folder / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(b["scaling_factor"]) and config["shift_factor"] == b["shift_factor"]
    assert "proposed scaling_factor" in one.stdout


def test_write_refuses_a_per_channel_config_and_leaves_it_unchanged(vae_folder):
    from sdvae.latents import write_factors

    config = json.loads((vae_folder / "config.json").read_text())
    config.update(latents_mean=[0.1] * 4, latents_std=[0.9] * 4, scaling_factor=0.5)
    (vae_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="per channel"):
        write_factors(vae_folder, 0.2)
    assert json.loads((vae_folder / "config.json").read_text()) == config
    config.update(latents_mean=None, latents_std=None)  # diffusers writes null when unset: a global factor is fine
    (vae_folder / "config.json").write_text(json.dumps(config))
    write_factors(vae_folder, 0.2, 0.05)
    written = json.loads((vae_folder / "config.json").read_text())
    assert (written["scaling_factor"], written["shift_factor"]) == (0.2, 0.05)
    assert not list(vae_folder.glob("*.tmp"))
