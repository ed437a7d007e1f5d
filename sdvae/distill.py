"""Distilling a tiny preview VAE from any KL VAE: the student is diffusers' AutoencoderTiny, the TAESD network.

The student's encoder learns the teacher's scaled latent mean (MSE); its decoder learns to turn the teacher's
scaled latents into the image (reconstruction + perceptual, and the adversarial term when disc_weight > 0), so
the two halves train side by side without touching each other. As TAESD, the student works on *scaled* latents
(its own scaling factor is 1, shift 0): a pipeline hands it the diffusion model's latents as they are.
TAESD's training code is unpublished; what it is known to do is in ../shared/RECIPE.md ("Tiny preview VAEs").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import TrainingOutputs

STUDENT_PRESETS = {
    # madebyollin/taesd: 64 channels throughout, about 1.22M parameters per half; for SD-sized teachers
    # (17x fewer decode MACs than sd-kl-f8's decoder).
    "taesd": dict(encoder_block_out_channels=(64,) * 4, decoder_block_out_channels=(64,) * 4),
    # The same layout at 16 channels (77K parameters per half): 14x fewer decode MACs than the `tiny` preset,
    # whose decoder costs about as much as TAESD's.
    "taesd-16": dict(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4),
}


def is_student(model: str) -> bool:
    return model in STUDENT_PRESETS


def build_student(model: str, teacher):
    """A randomly initialised AutoencoderTiny for `teacher`: its latent channels, scaling factor 1, no shift."""
    from diffusers import AutoencoderTiny

    levels = len(teacher.config.block_out_channels) - 1
    if levels != 3:  # AutoencoderTiny downsamples 8x, fixed
        raise ValueError(f"the teacher downsamples {2 ** levels}x; a tiny student ({model}) needs an 8x teacher")
    return AutoencoderTiny(latent_channels=teacher.config.latent_channels, scaling_factor=1.0, shift_factor=0.0,
                           force_upcast=False, **STUDENT_PRESETS[model])


def load_teacher(source: str):
    """The frozen teacher, in eval mode; the factors it scales latents by must be finite and nonzero."""
    from .sources import load_pretrained_vae

    teacher = load_pretrained_vae(source).eval().requires_grad_(False)
    if type(teacher).__name__ != "AutoencoderKL":
        raise ValueError(f"teacher {source} is an {type(teacher).__name__}; the teacher is a KL VAE (AutoencoderKL)")
    if teacher.config.get("latents_mean") is not None:
        raise ValueError(f"teacher {source} normalises latents per channel (latents_mean / latents_std): students of "
                         f"such VAEs are not supported yet")
    return teacher


def teacher_factors(teacher) -> tuple[float, float]:
    return float(teacher.config.scaling_factor), float(teacher.config.get("shift_factor") or 0.0)


@torch.no_grad()
def teacher_latents(teacher, x: torch.Tensor, noise_seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled mean, scaled sample): what the student's encoder is taught, and what its decoder is given. The
    decoder sees samples (noise_seed; None: the mean too) because diffusion models learn, and produce, those."""
    scale, shift = teacher_factors(teacher)
    posterior = teacher.encode(x).latent_dist
    mean = posterior.mode()
    z = mean if noise_seed is None else posterior.sample(generator=torch.Generator(x.device).manual_seed(noise_seed))
    return (mean - shift) * scale, (z - shift) * scale


class DistillationForward(torch.nn.Module):
    """The student's two halves in one forward (so that DDP wraps both): encode x against the teacher's scaled
    mean, decode the teacher's scaled latents against x. The teacher stays outside: it is not trained, and its
    weights stay out of the checkpoints."""

    def __init__(self, student):
        super().__init__()
        self.vae = student

    def forward(self, x: torch.Tensor, target: torch.Tensor, given: torch.Tensor) -> TrainingOutputs:
        encoded = self.vae.encoder(x)
        reconstruction = self.vae.decoder(given)
        latent_error = F.mse_loss(encoded.float(), target.float())
        logs = {"latent_std": encoded.detach().float().std()}
        return TrainingOutputs(reconstruction, None, None, None, logs, latent_error)


def last_decoder_layer(vae) -> torch.Tensor:
    """The weight LDM's adaptive adversarial weight is measured at: the decoder's output convolution."""
    if hasattr(vae.decoder, "conv_out"):
        return vae.decoder.conv_out.weight
    return [m for m in vae.decoder.layers if isinstance(m, torch.nn.Conv2d)][-1].weight  # AutoencoderTiny
