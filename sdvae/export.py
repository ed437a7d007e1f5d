"""Writing VAEs for the tools that load them: diffusers folders, the LDM single file UIs read, and TAESD's two
files for a tiny student; and `sdvae convert`, which writes a VAE in the other layout."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save

from .files import atomic_write, output_folder, printable, refuse_foreign_output, text_path
from .images import load_photo, pixels_to_tensor
from .layouts import diffusers_to_ldm, tiny_to_taesd
from .sources import SINGLE_FILE_SUFFIXES, load_pretrained_vae
from .weights import as_dtype, assert_finite, decode_latents, is_tiny, latent_mode, plain_config

FP16_BOUND = 4 * 2 / 255  # four 8-bit levels, on the [-1, 1] scale

# What ComfyUI (models/vae/) and AUTOMATIC1111 / Forge (models/VAE/) build when they load a single file: the SD
# VAE's blocks, whatever the file holds; the latent channels are those of a model family (SD 1.x/2.x/SDXL: 4,
# SD3/FLUX.1: 16). Any other architecture fails there with a size mismatch.
UI_ARCHITECTURE = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                       norm_num_groups=32, act_fn="silu", mid_block_add_attention=True)
UI_LATENT_CHANNELS = (4, 16)
# What TAESD clients (ComfyUI's vae_approx previews, madebyollin/taesd) build: 64 channels in every block.
TAESD_WIDTH = 64
TAESD_LATENT_CHANNELS = (4, 16)  # taesd / taesdxl; taesd3 / taef1


@torch.no_grad()
def fp16_check(vae, images: torch.Tensor | None = None, bound: float = FP16_BOUND, reference=None) -> dict:
    """Decode in fp16 and compare with fp32: non-finite values (the SD VAE's overflow) or a difference over
    `bound` mean pipelines must run this VAE in fp32 (`force_upcast: true`). `reference`: the VAE whose latents and
    fp32 decode the fp16 one is held against (fp16-fix: the original of a rescaled or fine-tuned copy); default
    `vae` itself."""
    if images is None:
        images = check_images()
    vae = vae.float().eval()
    reference = vae if reference is None else reference.float().eval()
    device = next(vae.parameters()).device
    latents = latent_mode(reference, images.to(device))
    expected = decode_latents(reference, latents)
    decoded = decode_latents(copy.deepcopy(vae).half(), latents.half()).float()
    nonfinite = not bool(torch.isfinite(decoded).all())
    difference = float((decoded - expected).abs().nan_to_num(float("inf")).max())
    return dict(max_abs_diff=difference, nonfinite=nonfinite, bound=bound,
                force_upcast=nonfinite or difference > bound, images=images.shape[0], size=images.shape[-1])


def ui_incompatibility(vae) -> str | None:
    """None when ComfyUI and AUTOMATIC1111 can build this VAE from its single file; else why they cannot."""
    if is_tiny(vae):
        return "it is a tiny student (AutoencoderTiny), which the UIs load as TAESD's files (--format taesd)"
    config = plain_config(vae)
    differ = [f"{k} {config.get(k)!r} (UIs: {v!r})" for k, v in UI_ARCHITECTURE.items() if config.get(k, v) != v]
    if config.get("latent_channels") not in UI_LATENT_CHANNELS:
        differ.append(f"latent_channels {config.get('latent_channels')} (UIs: 4 or 16)")
    if not differ:
        return None
    return (f"ComfyUI and AUTOMATIC1111 build the SD VAE architecture (128/256/512/512 channels, 2 layers per block, "
            f"32 norm groups) and cannot load this one: {'; '.join(differ)}")


def taesd_incompatibility(vae) -> str | None:
    """None when TAESD clients (ComfyUI previews, madebyollin/taesd) can build this student; else why not."""
    config = plain_config(vae)
    widths = [*config.get("encoder_block_out_channels", []), *config.get("decoder_block_out_channels", [])]
    if any(w != TAESD_WIDTH for w in widths):
        return (f"TAESD clients (ComfyUI's previews, madebyollin/taesd) build {TAESD_WIDTH} channels in every block; "
                f"this student has {sorted(set(widths))}: use its diffusers folder (AutoencoderTiny.from_pretrained)")
    if config.get("latent_channels") not in TAESD_LATENT_CHANNELS:
        return f"TAESD clients take 4 or 16 latent channels; this student has {config.get('latent_channels')}"
    return None


def check_images(resolution: int = 128) -> torch.Tensor:
    """Two real photos (scikit-image's), centre-cropped."""
    crops = []
    for name in ("astronaut", "coffee"):
        image = Image.fromarray(load_photo(name))
        image.thumbnail((2 * resolution, 2 * resolution))
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        crops.append(pixels_to_tensor(image.crop((left, top, left + resolution, top + resolution))))
    return torch.stack(crops)


def check_format(vae, format: str, source: str = "", warn: bool = True) -> None:
    """Refuse, before any work (the fp16 check takes 20 s on the SD VAE), a layout that cannot hold this kind of
    VAE, or that no client of the layout can build; warn where only some clients can."""
    name = printable(source) if source else "this VAE"
    if format == "single-file" and is_tiny(vae):
        raise ValueError(f"the single-file layout is the LDM KL VAE's; {name} is a tiny student (AutoencoderTiny): "
                         f"export it as a diffusers folder, --format taesd or --format onnx")
    if format == "taesd":
        if not is_tiny(vae):
            raise ValueError(f"TAESD's files hold a tiny student (AutoencoderTiny); {name} is a KL VAE: use "
                             f"--format single-file")
        reason = taesd_incompatibility(vae)
        if reason:
            raise ValueError(f"{name} cannot be written as TAESD's files: {reason}")
    if warn and format == "single-file" and ui_incompatibility(vae):
        warnings.warn(f"{name}: {ui_incompatibility(vae)}; the single file loads in sdvae, and in diffusers with "
                      f"AutoencoderKL.from_single_file(file, config=<its diffusers folder>)")


def save_single_file(vae, path: str | Path, dtype: str = "fp32", source: str = "", fp16: dict | None = None,
                     overwrite: bool = False) -> Path:
    """LDM-layout safetensors (what A1111 loads strictly and ComfyUI reads from models/vae/, for the SD
    architecture: ui_incompatibility), with metadata. An existing file that sdvae did not write is refused unless
    `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{printable(path)} is a folder; the single file needs a file name "
                                f"(e.g. {printable(path / 'vae.safetensors')})")
    refuse_foreign_output(path, overwrite)
    check_format(vae, "single-file", source)
    assert_finite(vae.state_dict(), f"{source or 'the VAE'}")
    state = {k: v.detach().to(as_dtype(dtype)).contiguous().cpu() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    architecture = plain_config(vae)
    if fp16 is not None:  # what the check measured, as in save_diffusers; loaders read it from the architecture
        architecture["force_upcast"] = fp16["force_upcast"]
    metadata = {
        "format": "pt",
        "sdvae.architecture": json.dumps(architecture),
        "sdvae.scaling_factor": str(vae.config.scaling_factor),
        "sdvae.source": printable(source),
        "sdvae.dtype": dtype,
    }
    if fp16 is not None:
        metadata["sdvae.fp16_check"] = json.dumps(fp16)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(state, metadata=metadata))
    return path


def save_diffusers(vae, folder: str | Path, dtype: str = "fp32", fp16: dict | None = None,
                   overwrite: bool = False) -> Path:
    """A diffusers folder, written whole or not at all; with an fp16 check, its config's force_upcast is what the
    check measured. An existing folder that holds what sdvae did not write is refused unless `overwrite`."""
    if Path(folder).is_file():  # save_pretrained would only log this and write nothing
        raise FileExistsError(f"{printable(folder)} is a file; a diffusers VAE is written as a folder")
    refuse_foreign_output(folder, overwrite)
    assert_finite(vae.state_dict(), f"the VAE for {printable(folder)}")
    if fp16 is not None:
        vae.register_to_config(force_upcast=fp16["force_upcast"])
    if as_dtype(dtype) != torch.float32:  # (diffusers' own .to() warns about an empty fp32 module list)
        torch.nn.Module.to(vae, as_dtype(dtype))
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    with output_folder(folder, "export", overwrite=True) as tmp, text_path(tmp) as writable:
        vae.save_pretrained(writable, safe_serialization=True)
    return Path(folder)


def save_taesd(vae, folder: str | Path, dtype: str = "fp32", source: str = "", overwrite: bool = False) -> Path:
    """A tiny student as TAESD's own files, taesd_encoder.safetensors and taesd_decoder.safetensors (ComfyUI's
    models/vae_approx previews; the diffusers folder is what pipelines load), written whole or not at all. They
    carry the student's config, so that sdvae loads the folder back as it was."""
    if Path(folder).is_file():
        raise FileExistsError(f"{printable(folder)} is a file; the TAESD export is a folder of two files")
    refuse_foreign_output(folder, overwrite)
    check_format(vae, "taesd", source)
    assert_finite(vae.state_dict(), f"{source or 'the VAE'}")
    metadata = {"format": "pt", "sdvae.config": json.dumps({"_class_name": "AutoencoderTiny", **plain_config(vae)}),
                "sdvae.source": printable(source), "sdvae.dtype": dtype}
    parts = tiny_to_taesd({k: v.detach().to(as_dtype(dtype)).contiguous().cpu() for k, v in vae.state_dict().items()})
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    with output_folder(folder, "export --format taesd", overwrite=True) as tmp:
        for part, state in parts.items():
            (tmp / f"taesd_{part}.safetensors").write_bytes(save(state, metadata=metadata))
    return Path(folder)


def convert(source: str | Path, out: str | Path, dtype: str = "fp32", overwrite: bool = False) -> tuple[str, Path]:
    """Convert between layouts, detecting the input's: LDM single file -> diffusers folder,
    diffusers (folder or bare state dict) -> LDM single file. Returns (direction, output path). An existing output
    that sdvae did not write is refused unless `overwrite`."""
    vae, layout = load_pretrained_vae(str(source), return_layout=True)
    if layout == "ldm":
        if Path(out).suffix in SINGLE_FILE_SUFFIXES:  # would be a folder called x.safetensors
            raise ValueError(f"{printable(source)} is already an LDM single file; convert writes it as a diffusers "
                             f"folder, not {printable(out)}. For a VAE-only single file: sdvae export "
                             f"{printable(source)} --format single-file --out {printable(out)}")
        return "ldm -> diffusers", save_diffusers(vae, out, dtype, overwrite=overwrite)
    return "diffusers -> ldm", save_single_file(vae, out, dtype, source=str(source), overwrite=overwrite)
