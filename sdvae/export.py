"""Writing VAEs for the tools that load them: diffusers folders, the LDM single file UIs read, and TAESD's two
files for a tiny student."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from .convert import diffusers_to_ldm, tiny_to_taesd
from .models import latent_mode
from .sources import as_dtype
from .files import atomic_folder, atomic_write

FP16_BOUND = 4 * 2 / 255  # four 8-bit levels, on the [-1, 1] scale


@torch.no_grad()
def fp16_check(vae, images: torch.Tensor | None = None, bound: float = FP16_BOUND) -> dict:
    """Decode in fp16 and compare with fp32: non-finite values (the SD VAE's overflow) or a difference over
    `bound` mean pipelines must run this VAE in fp32 (`force_upcast: true`)."""
    import copy

    if images is None:
        images = check_images()
    vae = vae.float().eval()
    device = next(vae.parameters()).device
    latents = latent_mode(vae, images.to(device))
    reference = vae.decode(latents).sample
    half = copy.deepcopy(vae).half()
    decoded = half.decode(latents.half()).sample.float()
    nonfinite = not bool(torch.isfinite(decoded).all())
    difference = float((decoded - reference).abs().nan_to_num(float("inf")).max())
    return dict(max_abs_diff=difference, nonfinite=nonfinite, bound=bound,
                force_upcast=nonfinite or difference > bound, images=images.shape[0], size=images.shape[-1])


def assert_finite(tensors: dict, what: str) -> None:
    """Weights with NaN or inf are never written as a model: they decode to black (or NaN) images."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what}: tensor {name} holds non-finite values (NaN or inf); nothing written")


def plain_config(vae) -> dict:
    """The VAE's config as JSON holds it (lists, no private keys), for the metadata of the files we write."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vae.config.items() if not k.startswith("_")}


def check_images(resolution: int = 128) -> torch.Tensor:
    """Two real photos (scikit-image's), centre-cropped."""
    from PIL import Image

    from .demo import load_photo
    from .images import pixels_to_tensor

    crops = []
    for name in ("astronaut", "coffee"):
        image = Image.fromarray(load_photo(name))
        image.thumbnail((2 * resolution, 2 * resolution))
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        crops.append(pixels_to_tensor(image.crop((left, top, left + resolution, top + resolution))))
    return torch.stack(crops)


def save_single_file(vae, path: str | Path, dtype: str = "fp32", source: str = "", fp16: dict | None = None) -> Path:
    """LDM-layout safetensors (what A1111 loads strictly and ComfyUI reads from models/vae/), with metadata."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; the single file needs a file name (e.g. {path / 'vae.safetensors'})")
    if type(vae).__name__ != "AutoencoderKL":
        raise ValueError(f"the single-file layout is the LDM KL VAE's; {source or 'this'} is a {type(vae).__name__}: "
                         f"export it as a diffusers folder, --format taesd (the files UIs load) or --format onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    assert_finite(vae.state_dict(), f"{source or 'the VAE'}")
    state = {k: v.detach().to(as_dtype(dtype)).contiguous().cpu() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    architecture = plain_config(vae)
    if fp16 is not None:  # what the check measured, as in save_diffusers; loaders read it from the architecture
        architecture["force_upcast"] = fp16["force_upcast"]
    metadata = {
        "format": "pt",
        "sdvae.architecture": json.dumps(architecture),
        "sdvae.scaling_factor": str(vae.config.scaling_factor),
        "sdvae.source": str(source),
        "sdvae.dtype": dtype,
    }
    if fp16 is not None:
        metadata["sdvae.fp16_check"] = json.dumps(fp16)
    atomic_write(path, save(state, metadata=metadata))
    return path


def save_diffusers(vae, folder: str | Path, dtype: str = "fp32", fp16: dict | None = None) -> Path:
    """A diffusers folder, written whole or not at all; with an fp16 check, its config's force_upcast is what the
    check measured."""
    if Path(folder).is_file():  # save_pretrained would only log this and write nothing
        raise FileExistsError(f"{folder} is a file; a diffusers VAE is written as a folder")
    assert_finite(vae.state_dict(), f"the VAE for {folder}")
    if fp16 is not None:
        vae.register_to_config(force_upcast=fp16["force_upcast"])
    if as_dtype(dtype) != torch.float32:  # (diffusers' own .to() warns about an empty fp32 module list)
        torch.nn.Module.to(vae, as_dtype(dtype))
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


def save_taesd(vae, folder: str | Path, dtype: str = "fp32", source: str = "") -> Path:
    """A tiny student as TAESD's own files, taesd_encoder.safetensors and taesd_decoder.safetensors (ComfyUI's
    models/vae_approx previews; the diffusers folder is what pipelines load), written whole or not at all. They
    carry the student's config, so that sdvae loads the folder back as it was."""
    if type(vae).__name__ != "AutoencoderTiny":
        raise ValueError(f"TAESD's files hold a tiny student (AutoencoderTiny); {source or 'this'} is a "
                         f"{type(vae).__name__}: use --format single-file")
    if Path(folder).is_file():
        raise FileExistsError(f"{folder} is a file; the TAESD export is a folder of two files")
    assert_finite(vae.state_dict(), f"{source or 'the VAE'}")
    metadata = {"format": "pt", "sdvae.config": json.dumps({"_class_name": "AutoencoderTiny", **plain_config(vae)}),
                "sdvae.source": str(source), "sdvae.dtype": dtype}
    parts = tiny_to_taesd({k: v.detach().to(as_dtype(dtype)).contiguous().cpu() for k, v in vae.state_dict().items()})
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp:
        for part, state in parts.items():
            (tmp / f"taesd_{part}.safetensors").write_bytes(save(state, metadata=metadata))
    return Path(folder)
