import pytest
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from PIL import Image

from sdvae.config import field_names
from sdvae.images import load_photo


@pytest.mark.slow
def test_demo_runs_offline_and_exports_a_diffusers_vae(tmp_path):
    """`sdvae train` with no data: the embedded demo, cut to a few steps."""
    env = {"TORCH_HOME": str(tmp_path / "torch"), "PATH": "", "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "sdvae", "train", "max_steps=3", "resolution=32",
                          f"output_dir={run}"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "WITHOUT the perceptual (LPIPS) loss" in out.stdout  # no VGG weights in this TORCH_HOME
    assert "held-out PSNR" in out.stdout and str(run / "vae") in out.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    held_out_files = sorted((run / "data" / "holdout").iterdir())
    assert metrics["steps"] == 3 and metrics["validation"]["images"] == min(64, len(held_out_files)) >= 40
    assert {Image.open(p).size for p in held_out_files} == {(128, 128)}  # scored whole, at val_resolution
    train_names = {p.stem for p in (run / "data" / "train").iterdir()}
    held_out = {p.stem.rsplit("-", 1)[0] for p in held_out_files}
    assert held_out == train_names  # every photo gives up a strip; the strip is not in train/
    for name in train_names:  # ... which is not in train/
        assert Image.open(run / "data" / "train" / f"{name}.png").width + 128 == load_photo_width(name)
    vae = AutoencoderKL.from_pretrained(run / "vae")
    with torch.no_grad():
        assert vae(torch.zeros(1, 3, 32, 32)).sample.shape == (1, 3, 32, 32)
    grid = Image.open(run / "reconstructions.png")  # four held-out squares, input | reconstruction | error
    assert grid.width >= 3 * 384 and grid.height >= 4 * 384


def load_photo_width(name):
    image = Image.fromarray(load_photo(name))
    image.thumbnail((512, 512))
    return image.width


def test_readme_documents_every_config_key():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)`", readme, re.M)) | set(
        re.findall(r"^\| `[a-z0-9_]+`, `([a-z0-9_]+)`", readme, re.M))
    assert set(field_names()) <= documented, set(field_names()) - documented
