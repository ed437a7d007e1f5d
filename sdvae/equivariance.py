"""Equivariance regularisation: latents that keep the image's geometry, so diffusion models learn them sooner.

EQ-VAE (Kouzelis et al. 2025, arXiv 2502.09509, code zelaki/eqvae) decodes a latent that was downscaled by s and
rotated by k x 90 degrees, and asks for the image downscaled and rotated alike; Skorokhodov et al. 2025 (arXiv
2502.14831) use the scale alone. Both remove the high-frequency energy of KL-f8 latents that an image does not have.

One `Transform` is drawn per step from a seed (so a resumed run draws what the uninterrupted one would) and applied
by the same function to the latent and to the image, at their own sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Transform:
    size: tuple[int, int]  # (h, w) of the latent after the resize; the image's is this times the VAE's factor
    quarter_turns: int  # rotation by quarter_turns x 90 degrees, 0 to 3

    def apply(self, tensor: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """The latent (factor 1: plain bilinear, as EQ-VAE) or the image (factor 8: bilinear with antialiasing, so the
        target is the downscaled photo rather than its aliases)."""
        size = (self.size[0] * factor, self.size[1] * factor)
        if tuple(tensor.shape[-2:]) != size:
            tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=factor > 1)
        return torch.rot90(tensor, self.quarter_turns, dims=(-2, -1)) if self.quarter_turns else tensor


@dataclass(frozen=True)
class Equivariance:
    """How often and which transforms: `prob` of the steps, latent sides scaled by s in [scales[0], scales[1]) on
    the latent's own grid, and with `rotate` a rotation by 1 to 3 quarter turns (as EQ-VAE: never none)."""
    prob: float = 0.5
    scales: tuple[float, float] = (0.25, 1.0)
    rotate: bool = True
    min_side: int = 2  # latent pixels: 16 image pixels, the least LPIPS-VGG's five stages take

    def draw(self, seed: int, latent_size: tuple[int, int]) -> Transform | None:
        """The step's transform, or None on a step without the term. At 256 px (a 32 x 32 latent) and scales
        (0.25, 1) the sides are 8 to 31: EQ-VAE's s/32 for s in 8..31."""
        generator = torch.Generator().manual_seed(seed)
        if float(torch.rand((), generator=generator)) >= self.prob:
            return None
        h, w = latent_size
        low = max(self.min_side, math.ceil(self.scales[0] * h - 1e-9))
        high = max(low + 1, math.ceil(self.scales[1] * h - 1e-9))  # exclusive; one size when the range is empty
        side = int(torch.randint(low, high, (), generator=generator))
        turns = int(torch.randint(1, 4, (), generator=generator)) if self.rotate else 0
        return Transform((side, max(self.min_side, round(w * side / h))), turns)
