"""The diffusion probe's denoiser: a diffusers network trained with rectified flow on a VAE's normalised latents.

Flow matching (rectified flow, as SD3): x_t = (1 - t) * z + t * eps, the network predicts the velocity eps - z,
the loss is its mean squared error. t ~ U(0, 1) in training; the held-out loss is taken on a fixed grid of t with
fixed noise, so every VAE is scored on the same (latent, t, noise) triples and the figure is deterministic.
Latents are normalised to unit variance first, so the losses of different VAEs are on one scale: a field the
network cannot predict at all (white noise) scores the highest loss a unit-variance input allows.
"""
from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from .data import seed_for

T_GRID = tuple((k + 0.5) / 10 for k in range(10))  # the held-out loss's t values
PRESETS = {
    # for checks that must take seconds
    "tiny": dict(kind="unet", block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=32),
    # a UNet a CPU trains in minutes on 16x16 latents (128 px images)
    "small": dict(kind="unet", block_out_channels=(64, 128, 128), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=32),
    # DiT-S/2 and DiT-B/2 (Peebles & Xie), the sizes the diffusability papers probe with, for GPUs
    "dit-s": dict(kind="dit", num_attention_heads=6, attention_head_dim=64, num_layers=12, patch_size=2),
    "dit-b": dict(kind="dit", num_attention_heads=12, attention_head_dim=64, num_layers=12, patch_size=2),
}


def white_noise_loss() -> float:
    """The lowest held-out loss on latents without any structure (unit-variance white noise), where the best
    prediction of eps - z from x_t is linear: E over T_GRID of 2 - (2t - 1)^2 / ((1 - t)^2 + t^2), about 1.57."""
    return sum(2 - (2 * t - 1) ** 2 / ((1 - t) ** 2 + t**2) for t in T_GRID) / len(T_GRID)


def build_denoiser(preset: str, channels: int, size: int, seed: int = 0) -> torch.nn.Module:
    """The preset's network for `channels`-wide latents of side `size`, initialised from `seed` (the same weights
    for every VAE of a width; only the input and output layers depend on the width)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown denoiser {preset!r}; choose from {', '.join(PRESETS)}")
    options = dict(PRESETS[preset])
    kind = options.pop("kind")
    torch.manual_seed(seed)
    if kind == "unet":
        return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, **options)

    if size % options["patch_size"]:
        raise ValueError(f"{preset} needs latents whose side is a multiple of {options['patch_size']}, got {size}")
    # one class label for every latent: DiT's adaLN-zero conditioning then carries the time step only
    return DiTTransformer2DModel(in_channels=channels, out_channels=channels, sample_size=size,
                                 num_embeds_ada_norm=1, **options)


def predict(model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity at (x_t, t); t in [0, 1] enters as a timestep in [0, 1000], the scale both networks embed."""
    inner = model.module if hasattr(model, "module") else model
    timestep = t * 1000
    if isinstance(inner, DiTTransformer2DModel):
        labels = torch.zeros(len(x_t), dtype=torch.long, device=x_t.device)
        return model(x_t, timestep=timestep, class_labels=labels).sample
    return model(x_t, timestep).sample


def flow_loss(model, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, per_item: bool = False) -> torch.Tensor:
    """Rectified-flow loss: MSE between the predicted and the true velocity eps - z at x_t = (1 - t) z + t eps."""
    tt = t.view(-1, 1, 1, 1)
    error = (predict(model, (1 - tt) * z + tt * eps, t) - (eps - z)) ** 2
    return error.flatten(1).mean(1) if per_item else error.mean()


def training_batch(latents: dict, step: int, batch_size: int, seed: int, device) -> tuple:
    """Step `step`'s (z, t, eps): images, posterior samples, t and noise are functions of (seed, step), so every
    VAE sees the same ones and a resumed run continues exactly. `latents`: normalised 'mean' and 'std' (N, C, h, w)."""
    g = torch.Generator().manual_seed(seed_for(seed, step))
    mean, std = latents["mean"], latents["std"]
    rows = torch.randint(len(mean), (batch_size,), generator=g)
    z = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=g)
    t = torch.rand(batch_size, generator=g)
    eps = torch.randn(z.shape, generator=g)
    return z.to(device), t.to(device), eps.to(device)


def heldout_triples(z: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every held-out latent at every t of T_GRID, each with its own noise seeded by (seed, image, t index)."""
    n = len(z)
    t = torch.tensor(T_GRID).repeat(n)
    eps = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed_for(seed, 11, i, k)))
                       for i in range(n) for k in range(len(T_GRID))])
    return z.repeat_interleave(len(T_GRID), 0), t, eps


@torch.no_grad()
def heldout_loss(model, triples, batch_size: int = 64) -> torch.Tensor:
    """(images, len(T_GRID)) loss of each held-out triple."""
    model.eval()
    device = next(model.parameters()).device
    z, t, eps = triples
    losses = [flow_loss(model, z[i:i + batch_size].to(device), t[i:i + batch_size].to(device),
                        eps[i:i + batch_size].to(device), per_item=True).float().cpu()
              for i in range(0, len(z), batch_size)]
    model.train()
    return torch.cat(losses).view(-1, len(T_GRID))


@torch.no_grad()
def sample(model, noise: torch.Tensor, steps: int = 25) -> torch.Tensor:
    """Euler integration of the learned flow from t = 1 (noise) to t = 0 (a normalised latent)."""
    model.eval()
    x = noise
    times = torch.linspace(1, 0, steps + 1, device=noise.device)
    for t0, t1 in zip(times[:-1], times[1:]):
        x = x + (t1 - t0) * predict(model, x, t0.expand(len(x)))
    model.train()
    return x
