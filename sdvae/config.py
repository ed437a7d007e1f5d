"""Training configuration: one dataclass, filled from a YAML file and `key=value` overrides.

Loss weights mean what they mean in the latent-diffusion recipe (see README, "Loss scale"):
`kl_weight = 1e-6` and `perceptual_weight = 1.0` are the published KL-f8 settings.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # model: a preset name (`tiny`, `sd-kl-f8`) or a path to a diffusers VAE folder / config.json; with `teacher`,
    # a tiny student preset (`taesd`, `taesd-16`)
    model: str = "tiny"
    # init_from: start from trained weights (diffusers folder, LDM/SD single file, or hub id); overrides `model`
    init_from: str | None = None
    # teacher: distil a tiny preview VAE (AutoencoderTiny, as TAESD) from this KL VAE (folder, single file, hub id)
    teacher: str | None = None
    latent_weight: float = 1.0  # the student's encoder: MSE against the teacher's scaled latent mean
    train_decoder_only: bool = False  # freeze encoder + quant_conv: latents of the source VAE stay valid
    gradient_checkpointing: bool = False

    # data: a folder of images (searched recursively) or a Hugging Face dataset (hub name or local path).
    # Left empty, `sdvae train` runs the embedded demo on the photos that scikit-image ships.
    data: str | None = None
    image_column: str = "image"
    data_split: str = "train"
    streaming: bool = False
    val_data: str | None = None  # folder or dataset of held-out images, scored with PSNR/SSIM
    val_split: str = "validation"  # split of val_data when it is a Hugging Face dataset
    val_max_images: int = 64
    val_resolution: int | None = None  # side of val_data's centre crops (default: resolution)
    resolution: int = 256
    random_flip: bool = True
    # random crops cover up to this many times `resolution` of the image, shrunk to it (log-uniform per crop), so
    # they hold more of the scene; 1: crops at native scale
    crop_downscale_max: float = 1.0
    max_pixels: int = 100_000_000  # images with more pixels are skipped and counted, before they are decoded
    # loader processes per training process; empty: 0 when training on the CPU (they would take cores from the
    # compute threads), else min(8, CPUs per process)
    num_workers: int | None = None
    # keep decoded training images in memory (up to this many MiB per process) instead of decoding every epoch
    image_cache_mb: int = 1024
    channels_last: bool = True  # the memory layout convolutions run fastest in, on CPUs and tensor cores alike

    # optimisation (Adam betas 0.5/0.9 as in the LDM recipe)
    batch_size: int = 4
    max_steps: int = 10_000
    max_minutes: float = 0.0  # stop early after this wall time (0: no limit); the run still exports
    learning_rate: float = 4.5e-6
    scale_lr: bool = False  # multiply learning_rate by processes x batch_size x accumulation, as LDM does
    optimizer: str = "adam"  # adam | adamw
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    adam_amsgrad: bool = False  # TAESD trained with AMSGrad
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0
    # constant | cosine: after the warm-up, down to lr_min_ratio x learning_rate where the run ends (max_steps, or
    # max_minutes when that comes first)
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 (fp32 master weights in every case)
    seed: int = 0

    # loss
    rec_loss: str = "l1"  # l1 | mse
    perceptual_weight: float = 1.0  # LPIPS (VGG); 0 does not load LPIPS at all
    lpips_vgg_weights: str | None = None  # local vgg16 ImageNet weights; default: the torch hub cache
    kl_weight: float = 1e-6
    sample_posterior: bool = True  # z = mu + sigma * eps while training (False: use the mean)
    # a VAE trained from scratch starts with this posterior log-variance (diffusers' init gives about 0: sigma 1, so
    # the first steps decode mostly noise); none: as initialised
    posterior_logvar_init: float | None = None
    # EQ-VAE's equivariance term: on a share of the steps the decoder also decodes the latent downscaled by s (and
    # rotated by k x 90 degrees), against the image transformed alike (README, "Latents for diffusion")
    equivariance_weight: float = 0.0  # 0: off, and no extra decode
    equivariance_prob: float = 0.5  # the share of steps with the term (EQ-VAE: 0.5)
    equivariance_scales: tuple[float, float] = (0.25, 1.0)  # s in [low, high) on the latent grid (EQ-VAE's range)
    equivariance_rotate: bool = True  # also rotate by 1-3 quarter turns (EQ-VAE); false: scale only
    learn_logvar: bool = False  # LDM's learned output log-variance: nll = rec / exp(logvar) + logvar
    logvar_init: float = 0.0

    # adversarial loss (LDM's PatchGAN); off while disc_weight is 0
    disc_weight: float = 0.0
    disc_start: int = 0  # step from which the discriminator trains and enters the generator loss
    disc_loss: str = "hinge"  # hinge | vanilla
    disc_learning_rate: float | None = None  # default: learning_rate; scaled as it by scale_lr
    disc_norm: str = "auto"  # batch | group | auto (batch, synchronised on GPUs; group on CPU with several processes)
    disc_layers: int = 3
    disc_channels: int = 64

    # EMA of the VAE weights
    ema_decay: float = 0.0  # 0: off; sd-vae-ft-ema/mse used EMA weights
    ema_warmup: bool = True  # ramp the decay up over the first steps (diffusers EMAModel warm-up)
    export_ema: bool = True  # export the EMA weights when EMA is on
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses in a row

    # latent factors measured at the end of the run (as `sdvae stats`) and written into the export: scaling_factor,
    # and shift_factor where the config has one (SD3 / FLUX); empty: when the encoder was trained
    measure_factors: bool | None = None
    measure_factors_images: int = 512  # the first N training images, centre-cropped at `resolution`

    # run folder, logging, checkpoints
    output_dir: str = "runs/sdvae"
    log_every: int = 10
    sample_every: int = 500  # image grids to TensorBoard and samples/
    preview_images: int = 8  # images in those grids (0: none, and no reconstructions.png at the end)
    checkpoint_every: int = 1000
    checkpoints_total_limit: int = 3  # keep the last K checkpoints (0: keep all)
    resume: str | None = None  # `latest` or a checkpoint folder
    skip_log_limit: int = 20  # unreadable files named in the log before they are only counted


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _coerce(name: str, hint, value):
    """Turn a YAML or command-line value into the field's type, with an error that names the key."""
    if value is None or isinstance(value, str) and value.lower() in ("none", "null", "~"):
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"config key '{name}' cannot be empty")
    if typing.get_origin(hint) is tuple:
        return _coerce_tuple(name, typing.get_args(hint), value)
    base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    base = base[0]
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            number = float(value)  # accepts "1e4" and 10000.0, refuses 1.5
            if not number.is_integer():
                raise ValueError
            return int(number)
        if base is float:
            return float(value)
        if isinstance(value, bool):  # YAML 1.1 reads `no` / `yes` as booleans (mixed_precision: no)
            return "yes" if value else "no"
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key '{name}' expects {base.__name__}, got {value!r}") from None


def _coerce_tuple(name: str, types: tuple, value) -> tuple:
    """A YAML list, or `a,b` / `[a, b]` on the command line."""
    items = value
    if isinstance(value, str):
        items = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
    if not isinstance(items, (list, tuple)) or len(items) != len(types):
        raise ValueError(f"config key '{name}' expects {len(types)} values (e.g. {name}=0.25,1.0), got {value!r}")
    return tuple(_coerce(name, t, v) for t, v in zip(types, items))


def build_config(values: dict) -> TrainConfig:
    valid = field_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}. Valid keys: {', '.join(valid)}")
    hints = typing.get_type_hints(TrainConfig)
    cfg = TrainConfig(**{k: _coerce(k, hints[k], v) for k, v in values.items()})
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    choices = {"rec_loss": ("l1", "mse"), "mixed_precision": ("no", "fp16", "bf16"), "optimizer": ("adam", "adamw"),
               "disc_loss": ("hinge", "vanilla"), "disc_norm": ("auto", "batch", "group"),
               "lr_schedule": ("constant", "cosine")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config key '{key}' must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    # log_every / sample_every divide the step count: 0 would crash the run after its first step
    for key in ("resolution", "batch_size", "max_steps", "gradient_accumulation_steps", "checkpoint_every",
                "log_every", "sample_every", "max_pixels", "measure_factors_images"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config key '{key}' must be at least 1, got {getattr(cfg, key)}")
    for key in ("resolution", "val_resolution"):
        if getattr(cfg, key) is not None and (getattr(cfg, key) < 8 or getattr(cfg, key) % 8):
            raise ValueError(f"{key} must be a multiple of 8 (the VAE downsamples 8x), got {getattr(cfg, key)}")
    if cfg.train_decoder_only and not cfg.init_from:
        raise ValueError("train_decoder_only needs init_from: the VAE whose encoder stays frozen")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.crop_downscale_max < 1:
        raise ValueError(f"crop_downscale_max must be at least 1 (1: native scale), got {cfg.crop_downscale_max}")
    if not 0 <= cfg.lr_min_ratio <= 1:
        raise ValueError(f"lr_min_ratio must be in [0, 1], got {cfg.lr_min_ratio}")
    low, high = cfg.equivariance_scales
    if not 0 < low <= high <= 1:
        raise ValueError(f"equivariance_scales must be two factors with 0 < low <= high <= 1, got {low}, {high}")
    if not 0 <= cfg.equivariance_prob <= 1:
        raise ValueError(f"equivariance_prob must be in [0, 1], got {cfg.equivariance_prob}")
    _check_distillation(cfg)
    if cfg.measure_factors and cfg.train_decoder_only:
        raise ValueError("measure_factors with train_decoder_only: the frozen encoder's latents are the source's, and so "
                         "are its factors (diffusion models and latent caches rely on them)")
    for key in ("perceptual_weight", "kl_weight", "latent_weight", "learning_rate", "equivariance_weight",
                "disc_weight", "disc_start", "lr_warmup_steps", "image_cache_mb", "max_minutes"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"config key '{key}' must not be negative")


def _check_distillation(cfg: TrainConfig) -> None:
    from .distill import STUDENT_PRESETS

    student = cfg.model in STUDENT_PRESETS
    if student and not cfg.teacher:
        raise ValueError(f"model={cfg.model} is a tiny student: it trains by distillation, set teacher=PATH (the VAE "
                         f"whose latents it learns)")
    if not cfg.teacher:
        return
    if not student:
        raise ValueError(f"teacher= distils into a tiny student: set model to one of {', '.join(STUDENT_PRESETS)} "
                         f"(got model={cfg.model})")
    refused = dict(train_decoder_only="the student's encoder and decoder learn separately already",
                   equivariance_weight="the student decodes the teacher's latents, which it does not shape",
                   learn_logvar="the student has no output variance", measure_factors="the student decodes the "
                   "teacher's scaled latents: its factors are 1 and 0 by construction",
                   gradient_checkpointing="diffusers' EncoderTiny skips its input scaling when checkpointing, and "
                   "the student is small enough without it")
    for key, why in refused.items():
        if getattr(cfg, key):
            raise ValueError(f"{key} with teacher=: {why}")


def check_at_least(settings, **minimums) -> None:
    """Settings that are counts or sizes: each named field (when set) at least its minimum, or one error naming it."""
    for key, minimum in minimums.items():
        value = getattr(settings, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{key} ({flag}) must be a whole number of at least {minimum}, got {value!r}")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = value.strip() or None  # typed by the field it sets (see _coerce)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                defaults: dict | None = None) -> TrainConfig:
    """defaults < YAML file < overrides."""
    values = dict(defaults or {})
    if path is not None:
        values.update(read_config_file(path))
    if overrides:
        values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return build_config(values)


def read_config_file(path: str | Path) -> dict:
    """A YAML mapping of config keys; a syntax error or a key that is not a name is one error with its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text()
        loaded = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ValueError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of config keys (key: value lines), not a {type(loaded).__name__}")
    for node, _ in yaml.compose(text).value:  # the same mapping, with the lines of its keys
        if not isinstance(yaml.safe_load(yaml.serialize(node)), str):
            raise ValueError(f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: config keys are "
                             f"names, got {node.value!r}")
    return loaded


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    from .files import atomic_write

    atomic_write(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
