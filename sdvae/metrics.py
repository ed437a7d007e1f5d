"""Reconstruction metrics on 8-bit images, as the published VAE tables compute them."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, clamped and rounded like a saved PNG."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images, peak 255."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM with an 11x11 Gaussian window (sigma 1.5) per channel, then averaged (Wang et al. 2004)."""
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """Encode with the posterior mode and decode (how reconstructions are scored)."""
    return vae.decode(vae.encode(x).latent_dist.mode()).sample


def score(inputs: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, list[float]]:
    a, b = to_uint8(inputs), to_uint8(reconstructions)
    return {"psnr": [psnr(x, y) for x, y in zip(a, b)], "ssim": [ssim(x, y) for x, y in zip(a, b)]}


def summarise(values: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for name, v in values.items():
        out[f"{name}_mean"] = float(np.mean(v))
        out[f"{name}_std"] = float(np.std(v))
    out["images"] = len(next(iter(values.values()), []))
    return out


def comparison_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, columns: int = 4) -> Image.Image:
    """Pairs (input | reconstruction) laid out `columns` pairs per row."""
    a, b = to_uint8(inputs), to_uint8(reconstructions)
    pairs = [np.concatenate([x, y], axis=1) for x, y in zip(a, b)]
    columns = min(columns, len(pairs))
    while len(pairs) % columns:
        pairs.append(np.full_like(pairs[0], 255))
    rows = [np.concatenate(pairs[i:i + columns], axis=1) for i in range(0, len(pairs), columns)]
    return Image.fromarray(np.concatenate(rows, axis=0))
