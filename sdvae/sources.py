"""Where a VAE comes from: diffusers folders, sdvae run folders, original LDM single files, whole SD checkpoints, hub
ids. Every command and `load_vae` load through `load_pretrained_vae`; bad files and bad config values are one
error naming the file and what is wrong, never a failure deep inside torch."""
from __future__ import annotations

import inspect
import json
import math
import pickle
import re
import struct
from pathlib import Path

import torch

from .convert import is_ldm_layout, ldm_to_diffusers, modernise_diffusers_keys, taesd_to_tiny
from .files import printable, text_path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LDM_PREFIXES = ("first_stage_model.", "vae.")  # whole SD checkpoints / some trainers
DROPPED_PREFIXES = ("loss.", "model_ema.")  # LDM's discriminator/LPIPS and EMA buffers travel in the same file
# Whole checkpoints tell their model family by their other keys; its VAE's factors follow (as diffusers reads them).
FAMILY_FACTORS = [
    (("conditioner.embedders.1.model.", "conditioner.embedders.0.model."),  # SDXL base, refiner
     dict(scaling_factor=0.13025, sample_size=1024)),
    (("model.diffusion_model.joint_blocks.",), dict(scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024)),  # SD3
    (("model.diffusion_model.double_blocks.",), dict(scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024)),  # FLUX.1
]


def file_config(path: str | Path, state: dict) -> dict:
    """Config values a file carries besides its shapes (norm groups, scaling factor, ...): our export's whole
    architecture, the config.json beside a diffusers weights file, or the factors of a whole checkpoint's family."""
    import inspect

    from diffusers import AutoencoderKL

    accepted = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}  # other versions' keys dropped
    if Path(path).suffix == ".safetensors":
        architecture = safetensors_header(path).get("__metadata__", {}).get("sdvae.architecture")
        if architecture:
            try:
                return {k: v for k, v in json.loads(architecture).items() if k in accepted}
            except (ValueError, AttributeError):
                raise ValueError(f"{path}: its sdvae.architecture metadata is not a JSON object") from None
    beside = Path(path).parent / "config.json"
    bare_diffusers = "encoder.conv_in.weight" in state and not is_ldm_layout(state)
    if bare_diffusers and beside.is_file():  # a diffusers folder's weights file, given on its own
        config = read_config_json(beside)
        if config.get("_class_name") == "AutoencoderKL":
            return {k: v for k, v in config.items() if k in accepted}
    if "edm_mean" in state and "edm_std" in state:  # Playground v2.5: (z - mean) * 0.5 / std, per channel
        return dict(scaling_factor=0.5, sample_size=1024, latents_mean=state["edm_mean"].flatten().tolist(),
                    latents_std=state["edm_std"].flatten().tolist())
    for markers, factors in FAMILY_FACTORS:
        if any(k.startswith(markers) for k in state):
            return factors
    return {}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a torch file loaded with weights_only=True (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        safetensors_header(path)  # a damaged file is named here, not by a SafetensorError
        with text_path(path) as readable:
            return load_file(readable)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0]).rstrip(". ")  # torch's message has ANSI bold
        raise ValueError(f"{path} holds Python objects besides tensors and is not loaded (weights_only=True "
                         f"refuses arbitrary pickles): {reason}. Convert it to .safetensors.") from None
    except Exception as e:  # truncated or not a torch file at all: torch fails with KeyError, EOFError, ...
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning checkpoints
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def vae_keys_only(state: dict) -> dict:
    """Take the VAE out of a whole SD checkpoint; drop the loss and EMA entries of LDM training checkpoints."""
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}


def config_from_state(state: dict, scaling_factor: float = 0.18215, source="the file") -> dict:
    """Read the architecture off the tensor shapes of a VAE state dict in either layout."""
    ldm = is_ldm_layout(state)
    down, block = ("encoder.down.", "block") if ldm else ("encoder.down_blocks.", "resnets")
    check_conv_shapes(state, source)
    try:
        levels = sorted({int(k[len(down):].split(".")[0]) for k in state if k.startswith(down)})
    except ValueError:
        raise ValueError(f"{source}: its {down}* keys are not numbered blocks") from None
    if any(f"{down}{i}.{block}.0.conv1.weight" not in state for i in levels) or not levels:
        raise ValueError(f"{source}: its encoder blocks ({down}N.{block}.0.conv1.weight) are missing or incomplete")
    channels = [state[f"{down}{i}.{block}.0.conv1.weight"].shape[0] for i in levels]
    layers = {int(k[len(f"{down}0.{block}."):].split(".")[0]) for k in state if k.startswith(f"{down}0.{block}.")}
    return dict(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        block_out_channels=channels,
        layers_per_block=len(layers),
        latent_channels=state["decoder.conv_in.weight"].shape[1],
        norm_num_groups=32,  # SD's; shapes cannot tell, so our exports carry theirs in the metadata
        act_fn="silu",
        scaling_factor=scaling_factor,
        sample_size=512,  # diffusers' enable_tiling() tiles at this size; its default of 32 would mean tiny tiles
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention=any(k.startswith(("encoder.mid.attn_1.", "encoder.mid_block.attentions.")) for k in state),
    )


def check_conv_shapes(state: dict, source) -> None:
    """Norm weights and biases are vectors, convolutions (out, in, kh, kw), attention projections matrices (or 1x1
    convolutions): a tensor of another rank is named here, before shapes are read off it or compared."""
    wrong = []
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        leaf = module.rsplit(".", 1)[-1]
        if kind == "bias" or "norm" in leaf:
            ranks = (1,)
        elif "conv" in leaf or leaf == "nin_shortcut":
            ranks = (4,)
        elif leaf in ("q", "k", "v", "proj_out", "to_q", "to_k", "to_v", "0", "query", "key", "value", "proj_attn"):
            ranks = (2, 4)
        else:
            continue
        if kind in ("weight", "bias") and value.ndim not in ranks:
            wrong.append(f"{key} {tuple(value.shape)}")
    if wrong:
        raise ValueError(f"{source}: tensors of the wrong rank for a VAE: {', '.join(wrong[:20])}"
                         + (f" and {len(wrong) - 20} more" if len(wrong) > 20 else ""))


def load_single_file(path: str | Path, return_layout: bool = False):
    """An AutoencoderKL from one file in either layout; the architecture comes from the file itself."""
    from diffusers import AutoencoderKL

    whole = read_state_dict(path)
    state = vae_keys_only(whole)
    if "encoder.conv_in.weight" not in state:
        raise ValueError(f"{path} holds no VAE weights (no encoder.conv_in.weight)")
    layout = "ldm" if is_ldm_layout(state) else "diffusers"
    found = file_config(path, whole)
    config = {**config_from_state(state, source=printable(path)), **found}
    if config["latent_channels"] != 4 and "scaling_factor" not in found:  # SD3's and FLUX.1's VAEs share one shape
        import warnings

        warnings.warn(f"{path}: {config['latent_channels']} latent channels and no scaling factor in the file; "
                      "SD's 0.18215 is a placeholder (SD3: 1.5305, shift 0.0609; FLUX.1: 0.3611, shift 0.1159). "
                      "Measure it with `sdvae stats --write --shift` or set it in config.json.")
    state = ldm_to_diffusers(state) if layout == "ldm" else modernise_diffusers_keys(state)
    vae = AutoencoderKL(**check_config(config, path))
    load_strict(vae, state, path)
    return (vae, layout) if return_layout else vae


def load_strict(vae, state: dict, source) -> None:
    """load_state_dict that names every missing, unexpected and mis-shaped key: never a partial load."""
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"{source}: weights do not fit the {type(vae).__name__} read from it: missing {missing[:20]}, "
                         f"unexpected {unexpected[:20]}, mismatched shapes {mismatched[:20]}")
    vae.load_state_dict(state)


def load_pretrained_vae(source: str, return_layout: bool = False):
    """Every VAE sdvae uses is loaded here: a diffusers folder (or pipeline / sdvae run folder), a single file (in
    the LDM or diffusers layout: `return_layout` also returns which), or a hub id. Weights holding NaN or inf are
    refused (they decode to black images and encode to NaN latents); the check costs 12 ms for the SD VAE (is_finite)."""
    vae, layout = _load_any(source)
    assert_finite(vae.state_dict(), printable(source), "it cannot be used")
    return (vae, layout) if return_layout else vae


def assert_finite(tensors: dict, what: str, consequence: str = "nothing written") -> None:
    """Weights with NaN or inf are never used nor written as a model: they decode to black (or NaN) images."""
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not is_finite(tensor)]
    if bad:
        raise ValueError(f"{what}: {len(bad)} weight tensor(s) hold non-finite values, NaN or inf ({', '.join(bad[:5])}"
                         f"{', ...' if len(bad) > 5 else ''}); {consequence}")


def is_finite(tensor: torch.Tensor) -> bool:
    """A finite sum means finite elements (NaN and inf propagate), at a tenth of isfinite's cost: 12 ms for the SD
    VAE's 84M weights on 2 cores, against 45 ms for its (memory-mapped) load; a sum that overflows is checked
    element by element."""
    return math.isfinite(float(tensor.detach().sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def _load_any(source: str):
    """(VAE, "ldm" | "diffusers" | "folder" | "hub") from any source load_pretrained_vae takes."""
    from diffusers import AutoencoderKL

    path = Path(source)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{printable(path)} is not a VAE weights file (a {', '.join(SINGLE_FILE_SUFFIXES)} file "
                             f"or a folder is)")
        return load_single_file(path, return_layout=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is not a regular file (a pipe, device or socket is never read)")
    if path.is_dir():
        for folder in (path, path / "vae"):
            if (folder / "config.json").is_file():
                return load_folder(folder), "folder"
        if (path / "config.yaml").is_file() and any(path.glob("checkpoint-*")):  # a run still training, or stopped
            from .checkpoints import load_checkpoint_vae

            return load_checkpoint_vae(path), "folder"
        if taesd_pair(path):
            return load_taesd(path), "folder"
        raise FileNotFoundError(f"{path} has no config.json (nor vae/config.json, nor TAESD's *_encoder.safetensors "
                                f"and *_decoder.safetensors)")
    if path.suffix in SINGLE_FILE_SUFFIXES or source.startswith((".", "/")):
        raise FileNotFoundError(f"file not found: {source}")
    parts = source.split("/")
    repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:  # a hub id (owner/repo[/subfolder]) such as stabilityai/sd-vae-ft-ema: needs a network or the HF cache
        return AutoencoderKL.from_pretrained(repo, subfolder=subfolder), "hub"
    except OSError as e:
        raise FileNotFoundError(f"'{source}' is not a local folder or file, and loading it from the "
                                f"Hugging Face hub failed: {str(e).splitlines()[0]}") from None


def load_folder(folder: Path):
    """A diffusers VAE folder, its config checked and its weights file verified before diffusers reads them."""
    config = check_config(read_config_json(folder / "config.json"), folder / "config.json")
    for weights in sorted(folder.glob("diffusion_pytorch_model*.safetensors")):
        safetensors_header(weights)
    try:
        with text_path(folder) as readable:  # safetensors cannot open a path that is not UTF-8
            return vae_class(config).from_pretrained(readable)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{printable(folder)}: its weights cannot be loaded ({str(e).splitlines()[0]})") from None


def taesd_pair(folder: Path) -> tuple[Path, Path] | None:
    """The one NAME_encoder.safetensors / NAME_decoder.safetensors pair in `folder` (taesd, taesdxl, taesd3, taef1
    or an sdvae export), or None."""
    encoders = sorted(folder.glob("*_encoder.safetensors"))
    pairs = [(e, e.with_name(e.name.replace("_encoder.", "_decoder."))) for e in encoders]
    pairs = [pair for pair in pairs if pair[1].is_file()]
    if len(pairs) > 1:
        names = ", ".join(e.name for e, _ in pairs)
        raise ValueError(f"{folder} holds {len(pairs)} TAESD encoder/decoder pairs ({names}); give a folder with one")
    return pairs[0] if pairs else None


def load_taesd(folder: Path):
    """A tiny autoencoder from TAESD's two files: the config sdvae wrote into them, else TAESD's own layout (its
    width and latent channels read from the weights' shapes), scaling factor 1 as TAESD decodes scaled latents."""
    from diffusers import AutoencoderTiny

    paths = taesd_pair(folder)
    encoder, decoder = (read_state_dict(p) for p in paths)
    config = json.loads(safetensors_header(paths[0]).get("__metadata__", {}).get("sdvae.config", "{}"))
    if not config:
        if "0.weight" not in encoder or "1.weight" not in decoder:
            raise ValueError(f"{paths[0].parent}: {paths[0].name} / {paths[1].name} are not TAESD's layout (no "
                             f"0.weight / 1.weight)")
        config = dict(encoder_block_out_channels=[encoder["0.weight"].shape[0]] * 4,
                      decoder_block_out_channels=[decoder["1.weight"].shape[0]] * 4,
                      latent_channels=decoder["1.weight"].shape[1], scaling_factor=1.0, shift_factor=0.0)
    config = check_config({**config, "_class_name": "AutoencoderTiny"}, paths[0])
    accepted = inspect.signature(AutoencoderTiny.__init__).parameters  # diffusers' config adds block_out_channels
    vae = AutoencoderTiny(**{k: v for k, v in config.items() if k in accepted})
    load_strict(vae, taesd_to_tiny(encoder, decoder), folder)
    return vae


def vae_class(config: dict):
    """AutoencoderTiny for a tiny student's config (TAESD, `sdvae train teacher=...`), else AutoencoderKL."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    return AutoencoderTiny if config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL


def read_config_json(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of config keys, not a {type(config).__name__}")
    return config


def safetensors_header(path: str | Path) -> dict:
    """The header of a safetensors file, after checking that it is one and that its tensors fit in the file
    (truncated, empty, garbage and absurd header lengths all end here, with the file named)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > min(size - 8, 100_000_000):
            raise ValueError(f"{path} is not a safetensors file (or it is truncated): "
                             f"{'no header' if length is None else f'a header of {length} bytes in {size}'}")
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            raise ValueError(f"{path} is not a safetensors file: its header is unreadable") from None
    if 8 + length + end != size:
        raise ValueError(f"{path} is damaged or truncated: {size} bytes where its header needs {8 + length + end}")
    return header


DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def as_dtype(dtype) -> torch.dtype:
    """torch.float16 or its names: "fp16", "bf16", "fp32" (and "float16", ...)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be one of fp32, fp16, bf16 (or torch.float32/float16/bfloat16), got {dtype!r}")


def cpu_has_fast_16bit() -> bool:
    """Whether this CPU computes bf16/fp16 natively (AVX512 and later); on AVX2 they are many times slower than fp32
    (eval/results/bench_inference_cpu.md)."""
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


def dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[as_dtype(dtype)]


BLOCK_TYPES = {"down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",)}
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")


def check_config(config: dict, source) -> dict:
    """The values AutoencoderKL would take and fail on later (or use silently: a zero scaling factor gives
    all-zero latents) are refused here, with the key named."""
    def refuse(key, expected):
        raise ValueError(f"{source}: config key '{key}' must be {expected}, got {config[key]!r}")

    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        if key in config and not whole(config[key]):
            refuse(key, "a positive integer")
    if "sample_size" in config and not (whole(config["sample_size"]) or isinstance(config["sample_size"], (list, tuple))
                                        and all(whole(v) for v in config["sample_size"])):
        refuse("sample_size", "a positive integer")
    blocks = config.get("block_out_channels")
    if blocks is not None and not (isinstance(blocks, (list, tuple)) and blocks and all(whole(c) for c in blocks)):
        refuse("block_out_channels", "a list of positive integers")
    groups = config.get("norm_num_groups", 32)
    if blocks and vae_class(config).__name__ == "AutoencoderKL" and any(c % groups for c in blocks):  # no norms in tiny
        refuse("block_out_channels", f"channel counts divisible by norm_num_groups ({groups})")
    for key, known in BLOCK_TYPES.items():
        types = config.get(key)
        if types is not None and not (isinstance(types, (list, tuple)) and all(t in known for t in types)
                                      and (blocks is None or len(types) == len(blocks))):
            refuse(key, f"a list of {' / '.join(known)}, one per block_out_channels entry")
    if "act_fn" in config and config["act_fn"] not in ACTIVATIONS:
        refuse("act_fn", f"one of {', '.join(ACTIVATIONS)}")
    if "scaling_factor" in config and not (number(config["scaling_factor"]) and config["scaling_factor"] > 0):
        refuse("scaling_factor", "a finite positive number")
    if config.get("shift_factor") is not None and not number(config["shift_factor"]):
        refuse("shift_factor", "a finite number or null")
    channels = config.get("latent_channels", 4)
    for key in ("latents_mean", "latents_std"):
        values = config.get(key)
        if values is not None and not (isinstance(values, (list, tuple)) and len(values) == channels
                                       and all(number(v) and (key == "latents_mean" or v > 0) for v in values)):
            refuse(key, f"null or a list of {channels} finite numbers" + (" above 0" if key == "latents_std" else ""))
    if "force_upcast" in config and not isinstance(config["force_upcast"], bool):
        refuse("force_upcast", "true or false")
    return config
