"""Latent diagnostics for `sdvae probe`: what a VAE's latents look like to a diffusion model, without training one.

- statistics: mean/std (the normalising factors), channel correlations, KL per channel;
- spectrum: the radially averaged power spectrum of the normalised latents beside the images' (Skorokhodov et al.
  2025 find that KL-f8 latents hold far more high-frequency energy than the images, which hurts diffusion), and the
  fraction of the energy above half the Nyquist frequency (white noise: 0.75);
- equivariance (EQ-VAE, Kouzelis et al. 2025): decode(T(z)) against T(x) for T = downscale by 2 and rotation by
  90 degrees, beside the ceiling decode(encode(T(x))): an exactly equivariant autoencoder reaches it;
- noise robustness: decode(z + sigma * eps) on the normalised scale, since a sampler's latents are never exact.

The functions take `encode(x) -> posterior mean` and `decode(z) -> x in [-1, 1]` on raw (unscaled) latents, so any
autoencoder can be measured, not only a diffusers one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import seed_for
from .images import to_uint8
from .metrics import psnr_batch

NOISE_SIGMAS = (0.1, 0.25, 0.5)
KL_IN_USE = 0.01  # nats per latent element: a channel whose posterior is this close to N(0, 1) carries ~nothing


def posterior_moments(means: torch.Tensor, stds: torch.Tensor) -> dict:
    """Statistics of z = mean + std * eps over (N, C, h, w) posterior means and stds, exactly (no sampling):
    E[z] = E[mean], E[z^2] = E[mean^2 + std^2]; KL(N(mean, std^2) || N(0, 1)) per channel in nats per element."""
    mu, sd = means.double(), stds.double()
    channels = mu.shape[1]
    flat_mu = mu.transpose(0, 1).reshape(channels, -1)
    var = (sd**2).transpose(0, 1).reshape(channels, -1).mean(1)
    channel_mean = flat_mu.mean(1)
    second = (flat_mu**2).mean(1) + var
    channel_std = (second - channel_mean**2).clamp_min(0).sqrt()
    mean = float(channel_mean.mean())
    std = math.sqrt(max(float(second.mean()) - mean**2, 0.0))
    centred = flat_mu - channel_mean[:, None]
    covariance = centred @ centred.T / centred.shape[1] + torch.diag(var)  # Cov(z) = Cov(mean) + E[std^2]
    scale = covariance.diagonal().clamp_min(1e-30).sqrt()
    correlation = covariance / scale[:, None] / scale[None, :]
    kl = 0.5 * (mu**2 + sd**2 - 1 - torch.log(sd.clamp_min(1e-30) ** 2))
    kl_channel = kl.transpose(0, 1).reshape(channels, -1).mean(1)
    return dict(channels=channels, mean=mean, std=std, scaling_factor=1 / std if std > 0 else math.inf,
                shift_factor=mean, channel_mean=channel_mean.tolist(), channel_std=channel_std.tolist(),
                channel_correlation=correlation.tolist(),
                max_abs_correlation=float((correlation - torch.eye(channels, dtype=correlation.dtype)).abs().max()),
                kl_per_channel=kl_channel.tolist(), channels_in_use=int((kl_channel > KL_IN_USE).sum()))


# --- spectrum -----------------------------------------------------------------------------------------------

def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix: row k is the cosine of frequency k / (2n) cycles per sample. The DCT, unlike the
    FFT, sees no jump at the edges (it extends the signal symmetrically), so a smooth field stays smooth."""
    k, i = torch.arange(n, dtype=dtype)[:, None], torch.arange(n, dtype=dtype)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def power_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, h, w) fields -> (radial frequency in cycles per sample, mean power) of every DCT coefficient."""
    h, w = x.shape[-2:]
    rows, cols = dct_matrix(h).to(x.device), dct_matrix(w).to(x.device)
    coefficients = rows @ x.double() @ cols.T
    power = (coefficients**2).mean((0, 1))
    fy = torch.arange(h, dtype=torch.float64)[:, None] / (2 * h)
    fx = torch.arange(w, dtype=torch.float64)[None, :] / (2 * w)
    return (fy**2 + fx**2).sqrt().flatten(), power.flatten().cpu()


def high_frequency_fraction(x: torch.Tensor) -> float:
    """Fraction of the energy (the constant term left out) at radial frequencies above half the Nyquist frequency
    (0.25 cycles per sample) among those up to it (0.5): 0.75 for white noise, near 0 for smooth fields."""
    radius, power = power_spectrum(x)
    inside = (radius > 0) & (radius <= 0.5)
    return float(power[inside & (radius > 0.25)].sum() / power[inside].sum().clamp_min(1e-300))


def radial_profile(x: torch.Tensor, bins: int | None = None) -> tuple[list[float], list[float]]:
    """Radially averaged power spectrum up to the Nyquist frequency, normalised to sum 1 (so that fields of any
    variance compare): (bin centres in cycles per sample, mean power per coefficient in each bin)."""
    radius, power = power_spectrum(x)
    bins = bins or max(x.shape[-2:])
    edges = torch.linspace(0, 0.5, bins + 1, dtype=torch.float64)
    centres, values = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (radius > lo) & (radius <= hi)
        if inside.any():
            centres.append(float((lo + hi) / 2))
            values.append(float(power[inside].mean()))
    total = sum(values) or 1.0
    return centres, [v / total for v in values]


def downsample_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images at the latents' size, antialiased (box filter), for the reference spectrum."""
    return F.interpolate(x.double(), size=size, mode="area")


# --- equivariance and noise ---------------------------------------------------------------------------------

def transforms() -> dict:
    """name -> (T on images, T on latents). Downscale: images box-filtered (antialiased), latents bilinear (at a
    factor of 2 both average 2x2 blocks, so an autoencoder that commutes with pooling is exactly equivariant)."""
    def half_image(x):
        return F.interpolate(x, scale_factor=0.5, mode="area")

    def half_latent(z):
        return F.interpolate(z, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=False)

    def rotate(t):
        return torch.rot90(t, 1, dims=(-2, -1))

    return {"downscale_2x": (half_image, half_latent), "rotate_90": (rotate, rotate)}


@torch.no_grad()
def equivariance(encode, decode, x: torch.Tensor, z: torch.Tensor | None = None) -> dict[str, dict[str, list]]:
    """Per image, for each transform: PSNR of decode(T(z)) against T(x), the ceiling PSNR of decode(encode(T(x)))
    against T(x), and the gap (ceiling - PSNR, 0 for an equivariant autoencoder). 8-bit PSNR; x in [-1, 1]."""
    z = encode(x) if z is None else z
    out = {}
    for name, (image_t, latent_t) in transforms().items():
        target = to_uint8(image_t(x))
        psnr = psnr_batch(target, to_uint8(decode(latent_t(z))))
        ceiling = psnr_batch(target, to_uint8(decode(encode(image_t(x)))))
        out[name] = {"psnr": psnr.tolist(), "ceiling": ceiling.tolist(), "gap": (ceiling - psnr).tolist()}
    return out


@torch.no_grad()
def noise_robustness(decode, x: torch.Tensor, z: torch.Tensor, scale: float, indices: list[int], seed: int = 0,
                     sigmas=NOISE_SIGMAS) -> dict[str, list]:
    """Per image PSNR of decode(z + sigma * eps / scale) against x: noise of std sigma on the normalised latents
    (z * scale has unit variance). eps is seeded by (seed, image index), the same for every VAE of a width."""
    eps = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed_for(seed, 7, i)))
                       for i in indices]).to(z)
    target = to_uint8(x)
    return {f"sigma_{s:g}": psnr_batch(target, to_uint8(decode(z + s * eps / scale))).tolist()
            for s in (0.0, *sigmas)}
