"""Model presets: the architectures `model:` can name, built as diffusers' AutoencoderKL."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL

from .equivariance import Transform

PRESETS = {
    # Exactly the Stable Diffusion 1.x / 2.x VAE (KL-f8): 34,163,592 encoder + 49,490,179 decoder parameters.
    "sd-kl-f8": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
        sample_size=512,
    ),
    # The same 8x / 4-channel interface, small enough to train on a laptop CPU.
    "tiny": dict(
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,  # a placeholder until measured on the training data
        sample_size=256,
    ),
    # The SD3 / SD3.5 and FLUX.1 VAE architecture: SD 1.x's blocks with 16 latent channels and no quant convs.
    # Their factors (SD3's here; FLUX.1: 0.3611 / 0.1159) are placeholders until measured at the end of the run.
    "kl-f8-16ch": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        sample_size=1024,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    ),
    # tiny with 16 latent channels in the SD3 / FLUX layout, for CPU runs.
    "tiny-16ch": dict(
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        scaling_factor=1.0,  # placeholders until measured on the training data
        shift_factor=0.0,
        sample_size=256,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'. Presets: {', '.join(PRESETS)}")
    levels = len(PRESETS[name]["block_out_channels"])
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        act_fn="silu",
        **PRESETS[name],
    )


def build_vae(model: str) -> AutoencoderKL:
    """A randomly initialised VAE from a preset name or a diffusers config (folder or config.json)."""
    if model in PRESETS:
        return AutoencoderKL(**preset_config(model))
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"model '{model}' is neither a preset ({', '.join(PRESETS)}) nor a diffusers config: {path} not found")
    from .sources import check_config, read_config_json

    return AutoencoderKL.from_config(check_config(read_config_json(path), path))


class TrainingOutputs(NamedTuple):
    reconstruction: torch.Tensor
    kl: torch.Tensor | None  # summed over latent elements, one value per image; None: no posterior (a student)
    logvar: torch.Tensor | None  # LDM's learned output log-variance
    equivariant: tuple | None  # (decode(T(z)), T(x)) on a step with the equivariance term
    latent_logs: dict  # detached: KL per latent channel, latent std (collapsed channels show in TensorBoard)
    latent_error: torch.Tensor | None = None  # a distilled student's encoder against the teacher's latents (MSE)


class VAETrainingForward(torch.nn.Module):
    """Encode, sample, decode in one forward, so that Accelerate/DDP wraps the whole pass.

    Calling `vae.encode` / `vae.decode` on the unwrapped model would bypass DDP and leave the
    gradients unsynchronised across processes. LDM's learned output log-variance lives here too, so
    that DDP synchronises its gradient with the rest, and so does the equivariance term's second decode.
    """

    def __init__(self, vae: AutoencoderKL, learn_logvar: bool = False, logvar_init: float = 0.0):
        super().__init__()
        self.vae = vae
        self.logvar = torch.nn.Parameter(torch.tensor(float(logvar_init))) if learn_logvar else None

    def forward(self, x: torch.Tensor, noise_seed: int | None = None, transform: Transform | None = None):
        """noise_seed: draw z = mu + sigma * eps with eps from this seed; None: use the posterior mean.
        transform: also decode T(z), with T(x) as its target (the equivariance term); None: not this step.

        Seeding the noise per step (rather than from the global RNG) makes a resumed run draw exactly
        the noise the uninterrupted run would have drawn.
        """
        encoder_frozen = not any(p.requires_grad for p in self.vae.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not encoder_frozen):
            posterior = self.vae.encode(x).latent_dist
        if noise_seed is None:
            z = posterior.mode()
        else:
            z = posterior.sample(generator=torch.Generator(x.device).manual_seed(noise_seed))
        reconstruction = self.vae.decode(z).sample
        equivariant = None
        if transform is not None:
            factor = x.shape[-1] // z.shape[-1]
            equivariant = (self.vae.decode(transform.apply(z)).sample, transform.apply(x, factor))
        return TrainingOutputs(reconstruction, posterior.kl(), self.logvar, equivariant, latent_logs(posterior, z))


@torch.no_grad()
def latent_logs(posterior, z: torch.Tensor) -> dict:
    """KL per latent channel (nats per latent element) and the std of the latents the decoder saw."""
    kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float())
    per_channel = kl.mean(dim=(0, 2, 3))
    logs = {f"kl_channel/{c:02d}": value for c, value in enumerate(per_channel.unbind())}
    logs["latent_std"] = z.detach().float().std()
    return logs


def is_tiny(vae) -> bool:
    """A tiny student (diffusers' AutoencoderTiny, or its ONNX graphs): no posterior, latents already scaled."""
    return type(vae).__name__ == "AutoencoderTiny" or getattr(vae, "is_tiny", False)


def latent_mode(vae, x: torch.Tensor) -> torch.Tensor:
    """The deterministic latent of x, unscaled: the posterior mode, or a tiny student's (AutoencoderTiny) latents."""
    encoded = vae.encode(x)
    return encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mode()


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
