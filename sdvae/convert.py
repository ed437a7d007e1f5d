"""Reading VAE weights from the files people have: diffusers folders, original LDM single files, whole SD checkpoints."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

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
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            architecture = (f.metadata() or {}).get("sdvae.architecture")
        if architecture:
            return {k: v for k, v in json.loads(architecture).items() if k in accepted}
    beside = Path(path).parent / "config.json"
    bare_diffusers = "encoder.conv_in.weight" in state and not is_ldm_layout(state)
    if bare_diffusers and beside.is_file():  # a diffusers folder's weights file, given on its own
        config = json.loads(beside.read_text())
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
        return load_file(str(path))
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


def is_ldm_layout(state: dict) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.block_1.")) for k in state)


def config_from_state(state: dict, scaling_factor: float = 0.18215) -> dict:
    """Read the architecture off the tensor shapes of a VAE state dict in either layout."""
    ldm = is_ldm_layout(state)
    down, block = ("encoder.down.", "block") if ldm else ("encoder.down_blocks.", "resnets")
    levels = sorted({int(k[len(down):].split(".")[0]) for k in state if k.startswith(down)})
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


def load_single_file(path: str | Path, return_layout: bool = False):
    """An AutoencoderKL from one file in either layout; the architecture comes from the file itself."""
    from diffusers import AutoencoderKL

    whole = read_state_dict(path)
    state = vae_keys_only(whole)
    if "encoder.conv_in.weight" not in state:
        raise ValueError(f"{path} holds no VAE weights (no encoder.conv_in.weight)")
    layout = "ldm" if is_ldm_layout(state) else "diffusers"
    found = file_config(path, whole)
    config = {**config_from_state(state), **found}
    if config["latent_channels"] != 4 and "scaling_factor" not in found:  # SD3's and FLUX.1's VAEs share one shape
        import warnings

        warnings.warn(f"{path}: {config['latent_channels']} latent channels and no scaling factor in the file; "
                      "SD's 0.18215 is a placeholder (SD3: 1.5305, shift 0.0609; FLUX.1: 0.3611, shift 0.1159). "
                      "Measure it with `sdvae stats --write --shift` or set it in config.json.")
    state = ldm_to_diffusers(state) if layout == "ldm" else modernise_diffusers_keys(state)
    vae = AutoencoderKL(**config)
    load_strict(vae, state, path)
    return (vae, layout) if return_layout else vae


def load_strict(vae, state: dict, source) -> None:
    """load_state_dict that names every missing, unexpected and mis-shaped key: never a partial load."""
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"{source}: weights do not fit the AutoencoderKL read from it: missing {missing[:20]}, "
                         f"unexpected {unexpected[:20]}, mismatched shapes {mismatched[:20]}")
    vae.load_state_dict(state)


def load_pretrained_vae(source: str):
    """`init_from`: a diffusers folder (or pipeline / sdvae run folder), a single file, or a hub id."""
    from diffusers import AutoencoderKL

    path = Path(source)
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return load_single_file(path)
    if path.is_dir():
        for folder in (path, path / "vae"):
            if (folder / "config.json").is_file():
                return AutoencoderKL.from_pretrained(folder)
        if (path / "config.yaml").is_file() and any(path.glob("checkpoint-*")):  # a run still training, or stopped
            from .checkpoints import load_checkpoint_vae

            return load_checkpoint_vae(path)
        raise FileNotFoundError(f"{path} has no config.json (nor vae/config.json)")
    if path.suffix in SINGLE_FILE_SUFFIXES or source.startswith((".", "/")):
        raise FileNotFoundError(f"file not found: {source}")
    parts = source.split("/")
    repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:  # a hub id (owner/repo[/subfolder]) such as stabilityai/sd-vae-ft-ema: needs a network or the HF cache
        return AutoencoderKL.from_pretrained(repo, subfolder=subfolder)
    except OSError as e:
        raise FileNotFoundError(f"'{source}' is not a local folder or file, and loading it from the "
                                f"Hugging Face hub failed: {str(e).splitlines()[0]}") from None


# (LDM, diffusers) name pieces, replaced in this order both ways: the mid-block names before the generic ones.
LAYOUT = [
    ("encoder.down.", "encoder.down_blocks."),
    ("mid.block_1.", "mid_block.resnets.0."),
    ("mid.block_2.", "mid_block.resnets.1."),
    ("mid.attn_1.", "mid_block.attentions.0."),
    (".block.", ".resnets."),
    ("downsample.", "downsamplers.0."),
    ("upsample.", "upsamplers.0."),
    ("nin_shortcut", "conv_shortcut"),
    ("norm_out", "conv_norm_out"),
]
ATTENTION = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
OLD_DIFFUSERS_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _convert(state: dict, to_diffusers: bool) -> dict:
    """Rename every key between the two layouts; the decoder's up blocks run in opposite orders in them and
    the attention projections are 1x1 convolutions in LDM, linear layers in diffusers."""
    up_from, up_to = ("decoder.up.", "decoder.up_blocks.") if to_diffusers else ("decoder.up_blocks.", "decoder.up.")
    attention = "mid_block.attentions.0." if to_diffusers else "mid.attn_1."
    pairs = LAYOUT if to_diffusers else [(b, a) for a, b in LAYOUT]
    names = ATTENTION if to_diffusers else {b: a for a, b in ATTENTION.items()}
    levels = len({k.split(".")[2] for k in state if k.startswith(up_from)})
    out = {}
    for key, value in state.items():
        if key.startswith(up_from):
            index, rest = key[len(up_from):].split(".", 1)
            key = f"{up_to}{levels - 1 - int(index)}.{rest}"
        for a, b in pairs:
            key = key.replace(a, b)
        if attention in key:
            head, tail = key.split(attention)
            old = next((n for n in names if tail.startswith(n)), None)
            key = head + attention + (names[old] + tail[len(old):] if old else tail)
            if value.ndim == 4 and to_diffusers:
                value = value[:, :, 0, 0]
            elif value.ndim == 2 and not to_diffusers:
                value = value[:, :, None, None]
        out[key] = value
    return out


def ldm_to_diffusers(state: dict) -> dict:
    """Original LDM layout (`encoder.down.N.block.M`, `mid.attn_1.q`, reversed `decoder.up`) -> diffusers."""
    return _convert(state, to_diffusers=True)


def diffusers_to_ldm(state: dict) -> dict:
    """diffusers AutoencoderKL keys -> the original LDM layout that single-file loaders read."""
    return _convert(state, to_diffusers=False)


def modernise_diffusers_keys(state: dict) -> dict:
    """diffusers before 0.14 named the VAE attention query/key/value/proj_attn."""
    out = {}
    for key, value in state.items():
        for old, new in OLD_DIFFUSERS_ATTENTION.items():
            key = key.replace(".attentions.0." + old, ".attentions.0." + new)
        out[key] = value
    return out
