"""Latent statistics: the scaling (and shift) factor a diffusion model should use with this VAE.

Diffusion training uses z = (latent - shift_factor) * scaling_factor, so the latents it sees have unit
variance: scaling_factor = 1 / std of the latents on the training data (SD 1.x: 0.18215), and for the
SD3 / FLUX convention shift_factor = their mean.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from accelerate.utils import reduce
from tqdm.auto import tqdm

from .data import build_dataset, seed_for
from .files import atomic_write


@torch.no_grad()
def latent_statistics(vae, data: str, resolution: int = 256, batch_size: int = 8, max_images: int | None = None,
                      sample: bool = True, seed: int = 0, state=None, image_column: str = "image",
                      max_pixels: int | None = None, split: str = "train") -> dict:
    """Per-channel and global mean/std of the encoder's latents over centre crops of `data`.

    Processes (`state`: Accelerate's PartialState) take disjoint slices of the images and add up float64
    sums, so any number of processes gives the same figures as one.
    """
    dataset = build_dataset(data, resolution, image_column, split, random_flip=False, random_crop=False,
                            max_pixels=max_pixels)
    if not hasattr(dataset, "__len__"):
        raise ValueError(f"{data} is streamed: latent statistics need a dataset of known size")
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    process, processes = (state.process_index, state.num_processes) if state else (0, 1)
    device = state.device if state else next(vae.parameters()).device
    mine = list(range(process, count, processes))
    channels = vae.config.latent_channels
    sums = torch.zeros(3, channels, dtype=torch.float64, device=device)  # n, sum z, sum z^2 per channel
    skipped = images = 0
    vae.eval()
    for start in tqdm(range(0, len(mine), batch_size), desc="latent stats", unit="batch", disable=process != 0):
        indices = mine[start:start + batch_size]
        items = [dataset[i] for i in indices]
        kept = [(i, it["pixel_values"]) for i, it in zip(indices, items) if it["pixel_values"] is not None]
        skipped += len(items) - len(kept)
        if not kept:
            continue
        x = torch.stack([image for _, image in kept]).to(device, next(vae.parameters()).dtype)
        posterior = vae.encode(x).latent_dist
        z = posterior.mode()
        if sample:  # as LDM measured its 0.18215: on samples z = mu + sigma * eps, eps seeded per image
            eps = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed_for(seed, i)))
                               for i, _ in kept]).to(z)
            z = posterior.mean + posterior.std * eps
        z = z.double().transpose(0, 1).reshape(channels, -1)
        sums += torch.stack([torch.full((channels,), z.shape[1], dtype=torch.float64, device=device),
                             z.sum(1), (z * z).sum(1)])
        images += len(kept)
    counts = torch.tensor([float(images), float(skipped)], dtype=torch.float64, device=device)
    if processes > 1:
        sums, counts = reduce(sums, reduction="sum"), reduce(counts, reduction="sum")
    n, s1, s2 = sums
    if n.sum() == 0:
        raise ValueError(f"no readable images in {data}")
    channel_mean = s1 / n
    channel_std = (s2 / n - channel_mean**2).clamp_min(0).sqrt()
    mean = s1.sum() / n.sum()
    std = math.sqrt(max(float(s2.sum() / n.sum() - mean**2), 0.0))
    return dict(images=int(counts[0].item()), skipped=int(counts[1].item()),
                resolution=resolution, sampled=sample, channel_mean=channel_mean.tolist(),
                channel_std=channel_std.tolist(), mean=float(mean), std=std,
                scaling_factor=1.0 / std, shift_factor=float(mean))


def config_path(folder: str | Path) -> Path:
    """The config.json of a diffusers VAE folder or of a run folder's vae/."""
    for path in (Path(folder) / "config.json", Path(folder) / "vae" / "config.json"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"--write needs a diffusers VAE folder (or a run folder); no config.json in {folder}")


def write_factors(folder: str | Path, scaling_factor: float, shift_factor: float | None = None) -> Path:
    """Put the factors into a diffusers VAE folder's config.json (what pipelines read)."""
    path = config_path(folder)
    config = json.loads(path.read_text())
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        # (z - latents_mean) * scaling_factor / latents_std: a global 1/std would scale these latents twice
        raise ValueError(f"{path} normalises latents per channel (latents_mean/latents_std, as Playground v2.5); "
                         f"a global factor is not written. The measured per-channel mean and std are in the output.")
    config["scaling_factor"] = scaling_factor
    if shift_factor is not None:
        config["shift_factor"] = shift_factor
    return atomic_write(path, json.dumps(config, indent=2, sort_keys=True) + "\n")  # never a half config.json
