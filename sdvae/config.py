"""Training configuration: one dataclass, filled from a YAML file and `key=value` overrides.

Loss weights mean what they mean in the latent-diffusion recipe (see README, "Loss scale"):
`kl_weight = 1e-6` and `perceptual_weight = 1.0` are the published KL-f8 settings.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from .files import atomic_write
from .presets import STUDENT_PRESETS

MAX_PIXELS = 100_000_000  # 100 MP: a 12000x8000 photo still loads; PIL's bomb warning starts at 89 MP


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
    # output_reference: the decoder learns this VAE's decode of the same latents instead of the image (with
    # train_decoder_only): a VAE that keeps another's outputs, as `sdvae fp16-fix` trains it
    output_reference: str | None = None
    # activations of the decoder above activation_limit are penalised: activation_weight * sum over layers of
    # mean(relu(|a| - limit)^2) / limit^2 (fp16's largest value is 65504; 0: off)
    activation_weight: float = 0.0
    activation_limit: float = 8188.0
    # relative_lr: each tensor learns at learning_rate x its own RMS at the start, so that weights thousands of times
    # larger than their neighbours (an fp16 overflow's) move as fast, relatively, as the rest
    relative_lr: bool = False
    # train_modules: comma-separated module names (decoder.mid_block.attentions.0, ...): only their parameters train
    train_modules: str | None = None
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
    max_pixels: int = MAX_PIXELS  # images with more pixels are skipped and counted, before they are decoded
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


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: from low to high, each end included unless it is open."""
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def holds(self, value) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return ""
        if self.high == math.inf:
            return f"{'above' if self.open_low else 'at least'} {_number(self.low)}"
        if self.low == -math.inf:
            return f"{'below' if self.open_high else 'at most'} {_number(self.high)}"
        return (f"in {'(' if self.open_low else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.open_high else ']'}")

    def must(self) -> str:
        """What the error says a value outside the range must be."""
        return "must not be negative" if self == at_least(0) else f"must be {self}"


def at_least(low: float) -> Range:
    return Range(low)


def above(low: float) -> Range:
    return Range(low, open_low=True)


def between(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Range:
    return Range(low, high, open_low, open_high)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


SEEDS = between(0, 2**32 - 1)  # what NumPy and torch.Generator take: a larger or negative seed fails in the run
LOGVARS = between(-30, 20)  # diffusers clamps the posterior's log-variance to this; beyond it nothing changes

# Every numeric setting of TrainConfig and the values it may take (None passes where the field allows it). Each is
# also checked to be finite, and a whole number where it is an int. A numeric field missing here is an error.
TRAIN_RANGES = {
    "latent_weight": at_least(0),
    "activation_weight": at_least(0),
    "activation_limit": above(0),
    "val_max_images": at_least(1),  # 0 would score no held-out image
    "val_resolution": at_least(8),
    "resolution": at_least(8),
    "crop_downscale_max": at_least(1),  # 1: crops at native scale
    "max_pixels": at_least(1),
    "num_workers": at_least(0),
    "image_cache_mb": at_least(0),  # 0: decode every epoch
    "batch_size": at_least(1),
    "max_steps": at_least(1),
    "max_minutes": at_least(0),  # 0: no limit
    "learning_rate": above(0),
    "adam_beta1": between(0, 1, open_high=True),
    "adam_beta2": between(0, 1, open_high=True),
    "weight_decay": at_least(0),
    "lr_warmup_steps": at_least(0),
    "lr_min_ratio": between(0, 1),
    "max_grad_norm": at_least(0),  # 0: no clipping
    "gradient_accumulation_steps": at_least(1),
    "seed": SEEDS,
    "perceptual_weight": at_least(0),
    "kl_weight": at_least(0),
    "posterior_logvar_init": LOGVARS,
    "equivariance_weight": at_least(0),
    "equivariance_prob": between(0, 1),
    "equivariance_scales": between(0, 1, open_low=True),  # each of the two; low <= high is checked in _check
    "logvar_init": LOGVARS,  # exp(logvar) divides the loss: far outside this it is 0 or inf
    "disc_weight": at_least(0),
    "disc_start": at_least(0),
    "disc_learning_rate": above(0),  # 0 would fall back to learning_rate silently
    "disc_layers": at_least(1),
    "disc_channels": at_least(1),
    "ema_decay": between(0, 1, open_high=True),  # 0: off
    "max_nonfinite_steps": at_least(1),
    "measure_factors_images": at_least(1),
    "log_every": at_least(1),  # log_every / sample_every / checkpoint_every divide the step count
    "sample_every": at_least(1),
    "preview_images": at_least(0),  # 0: no previews
    "checkpoint_every": at_least(1),
    "checkpoints_total_limit": at_least(0),  # 0: keep all
    "skip_log_limit": at_least(0),
}


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
    low, high = cfg.equivariance_scales  # first: this message says what the pair must be
    if not 0 < low <= high <= 1:
        raise ValueError(f"equivariance_scales must be two factors with 0 < low <= high <= 1, got {low}, {high}")
    check_ranges(cfg, TRAIN_RANGES, lambda key: f"config key '{key}'")
    for key in ("resolution", "val_resolution"):
        if getattr(cfg, key) is not None and (getattr(cfg, key) < 8 or getattr(cfg, key) % 8):
            raise ValueError(f"{key} must be a multiple of 8 (the VAE downsamples 8x), got {getattr(cfg, key)}")
    if cfg.train_decoder_only and not cfg.init_from:
        raise ValueError("train_decoder_only needs init_from: the VAE whose encoder stays frozen")
    if cfg.disc_weight and cfg.disc_norm == "group" and cfg.disc_channels % 16:  # GroupNorm(32, 2 x channels)
        raise ValueError(f"disc_channels must be a multiple of 16 with disc_norm=group, got {cfg.disc_channels}")
    _check_distillation(cfg)
    _check_output_reference(cfg)
    if cfg.measure_factors and cfg.train_decoder_only:
        raise ValueError("measure_factors with train_decoder_only: the frozen encoder's latents are the source's, and so "
                         "are its factors (diffusion models and latent caches rely on them)")


def _check_output_reference(cfg: TrainConfig) -> None:
    if cfg.output_reference and not cfg.train_decoder_only:
        raise ValueError("output_reference needs train_decoder_only=true: the target is the reference's decode of the "
                         "trained VAE's latents, which only a frozen encoder keeps the reference's")
    refused = dict(teacher="distillation has a teacher of its own", equivariance_weight="the equivariance term's "
                   "target is the transformed image, not the reference's decode", disc_weight="the target is the "
                   "reference's decode, which a discriminator would pull towards real images")
    for key, why in refused.items():
        if cfg.output_reference and getattr(cfg, key):
            raise ValueError(f"{key} with output_reference=: {why}")


def _check_distillation(cfg: TrainConfig) -> None:
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


def flag_name(key: str) -> str:
    """How a command's setting is named to its users: `learning_rate (--learning-rate)`."""
    return f"{key} (--{key.replace('_', '-')})"


def check_ranges(settings, ranges: dict[str, Range], name=flag_name) -> None:
    """Every numeric field of a settings dataclass is finite, a whole number where the field is an int, and in its
    range; None passes where the field allows it. Otherwise one error that names the setting (`name(key)`).
    A numeric field without a range is a programming error, found by the first use of the class."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        kind, optional = _numeric_kind(hints[field.name])
        if kind is None:
            continue
        if field.name not in ranges:
            raise TypeError(f"{type(settings).__name__}.{field.name} has no range in its table of ranges")
        value = getattr(settings, field.name)
        if value is None and optional:
            continue
        for item in value if isinstance(value, tuple) else (value,):
            problem = _number_problem(item, kind, ranges[field.name])
            if problem:
                raise ValueError(f"{name(field.name)} {problem}, got {value!r}")


def _numeric_kind(hint) -> tuple[type | None, bool]:
    """(int or float, whether None is allowed) for a number, an optional number or a tuple of numbers; the kind is
    None for any other field."""
    kinds = {a for a in typing.get_args(hint) if a not in (type(None), Ellipsis)} or {hint}
    kind = kinds.pop() if len(kinds) == 1 else None
    return (kind if kind in (int, float) else None), type(None) in typing.get_args(hint)


def _number_problem(value, kind: type, allowed: Range) -> str | None:
    """What `value` must be instead ("must be ..." as the error says it), or None when the setting may take it."""
    within = f", {allowed}" if str(allowed) else ""
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return f"must be a whole number{within}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be a number{within}"
    if not math.isfinite(value):  # NaN fails every comparison: said first, or the range would read as if it held
        return f"must be a finite number{within}"
    if not allowed.holds(value):
        return allowed.must()
    return None


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
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if isinstance(root, yaml.MappingNode):
            _check_keys(path, root)  # before loading: a list or mapping as a key cannot even be loaded
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
    return loaded


def _check_keys(path: Path, mapping: yaml.MappingNode) -> None:
    """Each key of the file's mapping is a plain name: not a number, an empty key, a list, a mapping (YAML's
    complex keys, `? [a, b]`) or a merge (`<<`)."""
    for key, _ in mapping.value:
        if isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:str":
            continue
        what = "a list" if isinstance(key, yaml.SequenceNode) else "a mapping" if isinstance(key, yaml.MappingNode) \
            else repr(key.value) if key.value else "an empty key"
        raise ValueError(f"{path}:{key.start_mark.line + 1}:{key.start_mark.column + 1}: config keys are names, "
                         f"got {what}")


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
