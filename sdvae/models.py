"""The models a run trains, and the modules its forward goes through: a KL VAE (diffusers' AutoencoderKL) from a
preset, a config or a file, wrapped so that one forward encodes, samples and decodes; or a tiny student
(AutoencoderTiny, the TAESD network) distilled from a frozen KL teacher.

Distillation: the student's encoder learns the teacher's scaled latent mean (MSE); its decoder learns to turn the
teacher's scaled latents into the image (reconstruction + perceptual, and the adversarial term when disc_weight >
0), so the two halves train side by side without touching each other. As TAESD, the student works on *scaled*
latents (its own scaling factor is 1, shift 0): a pipeline hands it the diffusion model's latents as they are.
TAESD's training code is unpublished; what it is known to do is in ../shared/RECIPE.md ("Tiny preview VAEs").
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny

from .config import TrainConfig
from .equivariance import Transform
from .fp16 import ActivationMaxima
from .presets import PRESETS, STUDENT_PRESETS, preset_config
from .sources import load_pretrained_vae
from .weights import KL, check_config, is_tiny, model_kind, read_config_json


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

    return AutoencoderKL.from_config(check_config(read_config_json(path), path))


class TrainingOutputs(NamedTuple):
    reconstruction: torch.Tensor
    kl: torch.Tensor | None  # summed over latent elements, one value per image; None: no posterior (a student)
    logvar: torch.Tensor | None  # LDM's learned output log-variance
    equivariant: tuple | None  # (decode(T(z)), T(x)) on a step with the equivariance term
    latent_logs: dict  # detached: KL per latent channel, latent std (collapsed channels show in TensorBoard)
    latent_error: torch.Tensor | None = None  # a distilled student's encoder against the teacher's latents (MSE)
    target: torch.Tensor | None = None  # what the reconstruction is compared with, where not the image itself
    activation_penalty: torch.Tensor | None = None  # activations above the limit (ActivationMaxima.penalty)


class VAETrainingForward(torch.nn.Module):
    """Encode, sample, decode in one forward, so that Accelerate/DDP wraps the whole pass.

    Calling `vae.encode` / `vae.decode` on the unwrapped model would bypass DDP and leave the
    gradients unsynchronised across processes. LDM's learned output log-variance lives here too, so
    that DDP synchronises its gradient with the rest, and so does the equivariance term's second decode.
    """

    def __init__(self, vae: AutoencoderKL, learn_logvar: bool = False, logvar_init: float = 0.0,
                 activation_limit: float | None = None):
        super().__init__()
        self.vae = vae
        self.logvar = torch.nn.Parameter(torch.tensor(float(logvar_init))) if learn_logvar else None
        # forward hooks (not parameters) keep the decoder's outputs of each step for the penalty on activations
        # above the limit; with gradient checkpointing they fire again in backward, after the penalty is taken
        self.activation_limit = activation_limit
        self.activations = ActivationMaxima(vae, ("decoder",), keep_tensors=True).__enter__() if activation_limit \
            else None

    def forward(self, x: torch.Tensor, noise_seed: int | None = None, transform: Transform | None = None,
                reference: AutoencoderKL | None = None):
        """noise_seed: draw z = mu + sigma * eps with eps from this seed; None: use the posterior mean.
        transform: also decode T(z), with T(x) as its target (the equivariance term); None: not this step.
        reference: a frozen VAE whose decode of the same z is the target, instead of x (output_reference). It is
        an argument, not a submodule, so that its weights stay out of the optimiser and the checkpoints.

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
        logs, penalty, target = latent_logs(posterior, z), None, None
        if self.activations is not None:  # taken now: a second decode below replaces the kept outputs
            penalty = self.activations.penalty(self.activation_limit)
            logs["max_activation"] = torch.stack([t.detach().abs().amax().float()
                                                  for kept in self.activations.kept.values() for t in kept]).max()
        if reference is not None:
            with torch.no_grad():
                target = reference.decode(z.detach()).sample
        equivariant = None
        if transform is not None:
            factor = x.shape[-1] // z.shape[-1]
            equivariant = (self.vae.decode(transform.apply(z)).sample, transform.apply(x, factor))
        return TrainingOutputs(reconstruction, posterior.kl(), self.logvar, equivariant, logs, None, target, penalty)


@torch.no_grad()
def latent_logs(posterior, z: torch.Tensor) -> dict:
    """KL per latent channel (nats per latent element) and the std of the latents the decoder saw."""
    kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float())
    per_channel = kl.mean(dim=(0, 2, 3))
    logs = {f"kl_channel/{c:02d}": value for c, value in enumerate(per_channel.unbind())}
    logs["latent_std"] = z.detach().float().std()
    return logs


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_student(model: str, teacher):
    """A randomly initialised AutoencoderTiny for `teacher`: its latent channels, scaling factor 1, no shift."""
    levels = len(teacher.config.block_out_channels) - 1
    if levels != 3:  # AutoencoderTiny downsamples 8x, fixed
        raise ValueError(f"the teacher downsamples {2 ** levels}x; a tiny student ({model}) needs an 8x teacher")
    return AutoencoderTiny(latent_channels=teacher.config.latent_channels, scaling_factor=1.0, shift_factor=0.0,
                           force_upcast=False, **STUDENT_PRESETS[model])


def load_teacher(source: str):
    """The frozen teacher, in eval mode; the factors it scales latents by must be finite and nonzero."""
    teacher = load_pretrained_vae(source).eval().requires_grad_(False)
    if model_kind(teacher) != KL:
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
    if model_kind(vae) == KL:
        return vae.decoder.conv_out.weight
    return [m for m in vae.decoder.layers if isinstance(m, torch.nn.Conv2d)][-1].weight  # AutoencoderTiny


def training_module(cfg: TrainConfig, device):
    """(the module every forward goes through, the frozen teacher or None, the frozen output reference or None): a
    VAE's encode-sample-decode, or with `teacher` a tiny student's two halves."""
    teacher = load_teacher(cfg.teacher).to(device) if cfg.teacher else None
    if teacher is not None:
        module = DistillationForward(trainable_student(cfg, teacher).train())
    else:
        module = VAETrainingForward(trainable_vae(cfg).train(), cfg.learn_logvar, cfg.logvar_init,
                                    cfg.activation_limit if cfg.activation_weight > 0 else None)
    reference = load_reference(cfg.output_reference, module.vae).to(device) if cfg.output_reference else None
    if cfg.channels_last:
        for model in (module, teacher, reference):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    return module, teacher, reference


def load_reference(source: str, vae):
    """The frozen VAE whose decode the trained one learns to reproduce: a KL VAE whose latents are the trained one's."""
    reference = load_pretrained_vae(source).eval().requires_grad_(False)
    if model_kind(reference) != KL or reference.config.latent_channels != vae.config.latent_channels:
        raise ValueError(f"output_reference {source} must be a KL VAE with {vae.config.latent_channels} latent "
                         f"channels, as the VAE trained")
    return reference


def trainable_vae(cfg: TrainConfig):
    vae = load_pretrained_vae(cfg.init_from) if cfg.init_from else build_vae(cfg.model)
    if cfg.posterior_logvar_init is not None and not cfg.init_from:
        set_posterior_logvar(vae, cfg.posterior_logvar_init)
    if cfg.train_decoder_only:  # the sd-vae-ft-mse recipe: latents of the source VAE stay valid
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:  # SD3 / FLUX VAEs have none
            vae.quant_conv.requires_grad_(False)
    if cfg.train_modules:
        train_only(vae, [name.strip() for name in cfg.train_modules.split(",") if name.strip()])
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return vae


def trainable_student(cfg: TrainConfig, teacher):
    """A new tiny student for the teacher, or (init_from) one to go on from, such as a published TAESD."""
    if not cfg.init_from:
        return build_student(cfg.model, teacher)
    student = load_pretrained_vae(cfg.init_from)
    if not is_tiny(student):
        raise ValueError(f"init_from {cfg.init_from} is an {type(student).__name__}; with teacher= it must be a tiny "
                         f"student (AutoencoderTiny)")
    if student.config.latent_channels != teacher.config.latent_channels:
        raise ValueError(f"init_from {cfg.init_from} has {student.config.latent_channels} latent channels, the "
                         f"teacher {teacher.config.latent_channels}")
    return student


def train_only(vae, names: list[str]) -> None:
    """Freeze every parameter but those of the named modules (which must exist, and not be frozen already)."""
    modules = dict(vae.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(f"train_modules: {', '.join(unknown)} not in this VAE (its modules are named like "
                         f"decoder.up_blocks.0.resnets.1)")
    trainable = {id(p) for name in names for p in modules[name].parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(f"train_modules: {', '.join(names)} hold no parameter that trains")
    for p in vae.parameters():
        p.requires_grad_(id(p) in trainable)


@torch.no_grad()
def set_posterior_logvar(vae, logvar: float) -> None:
    """Start the posterior's log-variance at `logvar` everywhere: its output layer (quant_conv, or the encoder's
    last conv where there is none) gets that bias and no weights on the log-variance half."""
    layer = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    half = layer.out_channels // 2
    layer.weight[half:] = 0
    layer.bias[half:] = logvar
