"""Weights files and the kinds of model: reading state dicts (safetensors, or torch files loaded with
weights_only=True), strict loading, config checks, finiteness, dtype names, and which kind a model is (a KL VAE, a
tiny student, onnxruntime's graphs) with the calls every kind answers. The bottom layer: it imports no other
sdvae module but files."""
from __future__ import annotations

import json
import math
import pickle
import re
import struct
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import load_file

from .files import text_path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a torch file loaded with weights_only=True (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
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



def vae_class(config: dict):
    """AutoencoderTiny for a tiny student's config (TAESD, `sdvae train teacher=...`), else AutoencoderKL."""
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
    if blocks and vae_class(config) is AutoencoderKL and any(c % groups for c in blocks):  # no norms in tiny
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


def plain_config(vae) -> dict:
    """The VAE's config as JSON holds it (lists, no private keys), for the metadata of the files we write."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vae.config.items() if not k.startswith("_")}


# The kinds of model sdvae runs, and the calls each answers. A diffusers AutoencoderKL has a posterior (mean,
# log-variance); an AutoencoderTiny (a distilled student, TAESD) maps images to latents directly; a GraphVAE runs
# the graphs of either kind outside PyTorch. Everything that must tell them apart asks here.
KL, TINY, GRAPHS = "kl", "tiny", "graphs"


class GraphVAE:
    """The interface of a VAE that is not a PyTorch module (sdvae.onnx.OnnxVAE): a diffusers-style `config`, whether
    its latents are a posterior, and encode / decode as the functions below call them."""
    config: dict
    latents_are_posterior: bool

    def encode_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def model_kind(model) -> str:
    """KL, TINY or GRAPHS; anything else is refused with its type named."""
    if isinstance(model, AutoencoderTiny):
        return TINY
    if isinstance(model, AutoencoderKL):
        return KL
    if isinstance(model, GraphVAE):
        return GRAPHS
    raise TypeError(f"expected a diffusers AutoencoderKL / AutoencoderTiny or an sdvae GraphVAE, got {type(model)}")


def latents_are_posterior(model) -> bool:
    """True for a KL VAE (and its graphs): encode gives a mean and log-variance to sample from. False for a tiny
    student, whose latents are deterministic and already scaled."""
    kind = model_kind(model)
    return kind == KL or (kind == GRAPHS and model.latents_are_posterior)


def is_tiny(model) -> bool:
    return not latents_are_posterior(model)


def encode_latents(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(posterior mean, log-variance), or (latents, None) for a tiny student: unscaled, in the model's dtype."""
    kind = model_kind(model)
    if kind == GRAPHS:
        return model.encode_latents(x)
    if kind == TINY:
        return model.encode(x).latents, None
    posterior = model.encode(x).latent_dist
    return posterior.mean, posterior.logvar


def latent_mode(model, x: torch.Tensor) -> torch.Tensor:
    """The deterministic latent of x, unscaled: the posterior mode (its mean), or a tiny student's latents."""
    return encode_latents(model, x)[0]


def decode_latents(model, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents to images in [-1, 1] (not clamped)."""
    if model_kind(model) == GRAPHS:
        return model.decode_latents(z)
    return model.decode(z).sample
