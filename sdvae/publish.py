"""`sdvae publish`: a trained VAE staged as a Hugging Face model repository (model card, diffusers files, the single
file UIs load) and uploaded with huggingface_hub when there is a network.

Layout of the staged folder (as stabilityai/sd-vae-ft-mse): config.json and diffusion_pytorch_model.safetensors at
the top, `<name>.safetensors` in the LDM layout beside them (KL VAEs), README.md, and the run's pictures.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

PICTURES = {"reconstructions.png": "held-out inputs (top) and reconstructions", "eval/grid.png": "`sdvae eval` grid"}


def stage(run: str | Path, repo_id: str, out: str | Path, license: str = "apache-2.0") -> Path:
    """Write the folder `publish` would upload into `out` (whole or not at all) and return it."""
    from .export import save_diffusers, save_single_file, save_taesd
    from .files import atomic_folder
    from .models import is_tiny
    from .sources import load_pretrained_vae

    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id must be owner/name, got {repo_id!r}")
    run, out = Path(run), Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "README.md").is_file():  # replaced whole: never a stranger
        raise FileExistsError(f"{out} is a folder that sdvae publish did not stage; choose another --out")
    vae = load_pretrained_vae(str(run))
    name = repo_id.split("/")[1]
    kl = not is_tiny(vae)
    with atomic_folder(out) as tmp:
        move_up(save_diffusers(vae, tmp / "diffusers"))
        if kl:
            save_single_file(vae, tmp / f"{name}.safetensors", source=str(run))
        else:  # TAESD's own files beside the diffusers ones, as madebyollin/taesd has them
            move_up(save_taesd(vae, tmp / "taesd", source=str(run)))
        shown = []
        for picture in PICTURES:
            if (run / picture).is_file():
                shutil.copyfile(run / picture, tmp / Path(picture).name)
                shown.append(picture)
        (tmp / "README.md").write_text(model_card(vae, run, repo_id, name, license, shown))
    return Path(out)


def move_up(folder: Path) -> None:
    """The files of `folder` into its parent (the exporters write whole folders; the repo has them at its top)."""
    for f in folder.iterdir():
        f.rename(folder.parent / f.name)
    folder.rmdir()


def model_card(vae, run: Path, repo_id: str, name: str, license: str, shown: list) -> str:
    from .config import read_config_file

    kind = type(vae).__name__
    config = read_config_file(run / "config.yaml") if (run / "config.yaml").is_file() else None
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    meta = dict(library_name="diffusers", license=license, tags=["sdvae", "vae", "autoencoder", "stable-diffusion", kind])
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"A {vae.config.latent_channels}-channel {kind} (8x downsampling) trained with sdvae. Latents for diffusion: `(z - shift_factor) * scaling_factor` with scaling_factor "
             f"**{scale:.6g}**" + (f" and shift_factor **{shift:.6g}**." if shift else "."), ""]
    if config and config.get("teacher"):
        lines += [f"A tiny preview decoder distilled from `{config['teacher']}`: it takes that VAE's *scaled* latents "
                  f"as they are (its own factors are 1 and 0).", ""]
    lines += ["## Use it", "", "```python", f"from diffusers import {kind}", "",
              f'vae = {kind}.from_pretrained("{repo_id}")',
              *(["latents = vae.encode(images).latents  # images: (B, 3, H, W) in [-1, 1]; already scaled"]
                if kind != "AutoencoderKL" else [
                "z = vae.encode(images).latent_dist.mode()  # images: (B, 3, H, W) in [-1, 1]",
                "latents = (z - (vae.config.shift_factor or 0)) * vae.config.scaling_factor  # what diffusion sees",
                "images = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0)).sample"]),
              "# or in a diffusers pipeline trained on these latents: Pipeline.from_pretrained(..., vae=vae)",
              "```", ""]
    if kind == "AutoencoderKL":
        lines += [f"ComfyUI: put `{name}.safetensors` in `models/vae/`; AUTOMATIC1111 / Forge: in `models/VAE/`, then "
                  f"choose it as the SD VAE. It is the original LDM layout, loaded strictly.", ""]
    else:
        lines += ["ComfyUI live previews: put `taesd_decoder.safetensors` (and `taesd_encoder.safetensors`) in "
                  "`models/vae_approx/`, named for the teacher's family (`taesd_`, `taesdxl_`, `taesd3_`, `taef1_`). "
                  "They are TAESD's own layout.", ""]
    lines += results(run, metrics, shown)
    if config:
        lines += ["## Training configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def results(run: Path, metrics: dict, shown: list) -> list:
    lines = []
    if (run / "eval" / "table.md").is_file():
        lines += ["## Evaluation (`sdvae eval`)", "", (run / "eval" / "table.md").read_text().strip(), ""]
    validation = metrics.get("validation")
    if validation:
        lines += ["## Held-out reconstruction at the end of training", "",
                  f"PSNR {validation['psnr_mean']:.2f} dB, SSIM {validation['ssim_mean']:.4f} on "
                  f"{validation['images']} held-out crops, after {metrics.get('steps')} steps.", ""]
    for picture in shown:
        lines += [f"![{PICTURES[picture]}]({Path(picture).name})", ""]
    return lines


def publish(folder: Path, repo_id: str, private: bool) -> str:
    """Upload the staged folder; one error line that says where the folder is when the hub cannot be reached."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload VAE with sdvae publish")
    except Exception as e:  # no network, no token, no permission: all end with the staged folder kept
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"upload to {repo_id} failed ({first}); the staged folder is {folder}: upload it "
                              f"later with `huggingface-cli upload {repo_id} {folder}`") from None
    return str(getattr(commit, "commit_url", commit))
