"""Where a VAE comes from: diffusers folders, sdvae run folders, original LDM single files, whole SD checkpoints, hub
ids. Every command and `load_vae` load through `load_pretrained_vae`; bad files and bad config values are one
error naming the file and what is wrong, never a failure deep inside torch."""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

from diffusers import AutoencoderKL, AutoencoderTiny

from .checkpoints import load_checkpoint_vae
from .files import printable, text_path
from .layouts import is_ldm_layout, ldm_to_diffusers, modernise_diffusers_keys, taesd_to_tiny
from .weights import (assert_finite, check_config, check_conv_shapes, load_strict, read_config_json, read_state_dict,
                      safetensors_header, vae_class)

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


def load_single_file(path: str | Path, return_layout: bool = False):
    """An AutoencoderKL from one file in either layout; the architecture comes from the file itself."""
    whole = read_state_dict(path)
    state = vae_keys_only(whole)
    if "encoder.conv_in.weight" not in state:
        raise ValueError(f"{path} holds no VAE weights (no encoder.conv_in.weight)")
    layout = "ldm" if is_ldm_layout(state) else "diffusers"
    found = file_config(path, whole)
    config = {**config_from_state(state, source=printable(path)), **found}
    if config["latent_channels"] != 4 and "scaling_factor" not in found:  # SD3's and FLUX.1's VAEs share one shape
        warnings.warn(f"{path}: {config['latent_channels']} latent channels and no scaling factor in the file; "
                      "SD's 0.18215 is a placeholder (SD3: 1.5305, shift 0.0609; FLUX.1: 0.3611, shift 0.1159). "
                      "Measure it with `sdvae stats --write --shift` or set it in config.json.")
    state = ldm_to_diffusers(state) if layout == "ldm" else modernise_diffusers_keys(state)
    vae = AutoencoderKL(**check_config(config, path))
    load_strict(vae, state, path)
    return (vae, layout) if return_layout else vae


def load_pretrained_vae(source: str, return_layout: bool = False):
    """Every VAE sdvae uses is loaded here: a diffusers folder (or pipeline / sdvae run folder), a single file (in
    the LDM or diffusers layout: `return_layout` also returns which), or a hub id. Weights holding NaN or inf are
    refused (they decode to black images and encode to NaN latents); the check costs 12 ms for the SD VAE (is_finite)."""
    vae, layout = _load_any(source)
    assert_finite(vae.state_dict(), printable(source), "it cannot be used")
    return (vae, layout) if return_layout else vae


def _load_any(source: str):
    """(VAE, "ldm" | "diffusers" | "folder" | "hub") from any source load_pretrained_vae takes."""
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


