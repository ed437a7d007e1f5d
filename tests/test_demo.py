import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from sdvae.config import field_names


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
    assert metrics["steps"] == 3 and metrics["validation"]["images"] == 64
    train_names = {p.stem for p in (run / "data" / "train").iterdir()}
    held_out = {p.stem.rsplit("-", 1)[0] for p in (run / "data" / "holdout").iterdir()}
    assert held_out == train_names  # every photo gives up a strip; the strip is not in train/
    vae = AutoencoderKL.from_pretrained(run / "vae")
    with torch.no_grad():
        assert vae(torch.zeros(1, 3, 32, 32)).sample.shape == (1, 3, 32, 32)
    assert (run / "reconstructions.png").is_file()


def test_readme_documents_every_config_key():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)`", readme, re.M)) | set(
        re.findall(r"^\| `[a-z0-9_]+`, `([a-z0-9_]+)`", readme, re.M))
    assert set(field_names()) <= documented, set(field_names()) - documented
