"""Reading VAE weights from the files people have: diffusers folders, original LDM single files, whole SD checkpoints."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LDM_PREFIXES = ("first_stage_model.", "vae.")  # whole SD checkpoints / some trainers
DROPPED_PREFIXES = ("loss.", "model_ema.")  # LDM's discriminator/LPIPS and EMA buffers travel in the same file


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
        raise ValueError(f"{path} holds Python objects besides tensors and is not loaded (weights_only=True "
                         f"refuses arbitrary pickles): {str(e).splitlines()[0]}. Convert it to .safetensors.") from None
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
        latent_channels=state["post_quant_conv.weight"].shape[0],
        norm_num_groups=32,
        act_fn="silu",
        scaling_factor=scaling_factor,
    )


def load_single_file(path: str | Path):
    """An AutoencoderKL from one file in either layout; the architecture comes from the file itself."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = vae_keys_only(read_state_dict(path))
    if "encoder.conv_in.weight" not in state:
        raise ValueError(f"{path} holds no VAE weights (no encoder.conv_in.weight)")
    config = config_from_state(state)
    if is_ldm_layout(state):
        state = convert_ldm_vae_checkpoint(state, config)
    vae = AutoencoderKL(**config)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the architecture read from it; "
                         f"missing {sorted(missing)[:20]}, unexpected {sorted(unexpected)[:20]}")
    return vae


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
        raise FileNotFoundError(f"init_from: {path} has no config.json (nor vae/config.json)")
    if path.suffix in SINGLE_FILE_SUFFIXES or source.startswith((".", "/")):
        raise FileNotFoundError(f"init_from: file not found: {source}")
    parts = source.split("/")
    repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:  # a hub id (owner/repo[/subfolder]) such as stabilityai/sd-vae-ft-ema: needs a network or the HF cache
        return AutoencoderKL.from_pretrained(repo, subfolder=subfolder)
    except OSError as e:
        raise FileNotFoundError(f"init_from: '{source}' is not a local folder or file, and loading it from the "
                                f"Hugging Face hub failed: {str(e).splitlines()[0]}") from None


def diffusers_to_ldm(state: dict) -> dict:
    """diffusers AutoencoderKL keys -> the original LDM layout (decoder `up` blocks reversed,
    attention projections as 1x1 convolutions). The inverse of diffusers' own LDM loader."""
    levels = len({k.split(".")[2] for k in state if k.startswith("decoder.up_blocks.")})
    out = {}
    for key, value in state.items():
        new = key.replace("encoder.down_blocks.", "encoder.down.")
        if new.startswith("decoder.up_blocks."):
            i = int(new.split(".")[2])
            new = f"decoder.up.{levels - 1 - i}." + new.split(".", 3)[3]
        new = (new.replace(".resnets.", ".block.").replace("downsamplers.0", "downsample")
               .replace("upsamplers.0", "upsample").replace("conv_shortcut", "nin_shortcut")
               .replace("mid_block.block.0", "mid.block_1").replace("mid_block.block.1", "mid.block_2")
               .replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_norm_out", "norm_out"))
        if ".mid.attn_1." in new:
            new = (new.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k")
                   .replace("to_v", "v").replace("to_out.0", "proj_out"))
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out
