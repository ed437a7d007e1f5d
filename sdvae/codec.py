"""Images <-> latents with a trained VAE: `codec = sdvae.load_vae(path); z = codec.encode(images)`."""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from .files import (ForeignOutput, atomic_write, describe_error, file_is_ours, prepare_output_folder, printable,
                    text_path)
from .images import IMAGE_EXTENSIONS, open_image, pixels_to_tensor, png_bytes, require_regular_file, to_rgb, to_uint8
from .onnx import OnnxVAE, cached_graphs, is_graph_folder
from .sources import load_pretrained_vae
from .tiling import default_budget, tiled_decode, tiled_encode, untiled_bytes
from .weights import (GRAPHS, TINY, as_dtype, cpu_has_fast_16bit, decode_latents, encode_latents, latents_are_posterior,
                      model_kind, safetensors_header)


def to_tensor(image) -> torch.Tensor:
    """A PIL image, an HxWx3 uint8 array or a (3, H, W) float tensor in [-1, 1] -> (3, H, W) float in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or 0 in image.shape:
            raise ValueError(f"image tensors must be (3, H, W) in [-1, 1] with H, W >= 1, got {tuple(image.shape)}")
        return check_range(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 (H, W[, 3]), got {image.dtype}")
        if image.ndim not in (2, 3) or 0 in image.shape:
            raise ValueError(f"numpy images must be (H, W) or (H, W, 3) with H, W >= 1, got {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected PIL images, uint8 arrays or tensors, got {type(image).__name__}")
    if 0 in image.size:
        raise ValueError(f"encode got an empty image ({image.width}x{image.height} pixels)")
    return pixels_to_tensor(to_rgb(image))


def check_range(x: torch.Tensor) -> torch.Tensor:
    """Tensors are images in [-1, 1]: 8-bit or 0-1 pixels given as tensors would encode as something else."""
    if not x.is_floating_point():
        raise TypeError(f"image tensors must be floats in [-1, 1], got {x.dtype} (8-bit pixels: x / 127.5 - 1)")
    low, high = float(x.min()), float(x.max())
    if not (-1.01 <= low and high <= 1.01):  # NaN fails too
        raise ValueError(f"image tensors must hold values in [-1, 1], got [{low:.4g}, {high:.4g}]"
                         + (" (0-255 pixels: x / 127.5 - 1)" if high > 2 else ""))
    return x.float()


def check_tile_size(tile_size) -> None:
    if tile_size is not None and not (isinstance(tile_size, int) and tile_size >= 8):
        raise ValueError(f"tile_size must be a whole number of pixels, at least 8, got {tile_size!r}")


def as_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda, cuda:N or a torch.device, got {device!r}") from None


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Reflect-pad right and bottom (the edge is repeated where the image is too small to reflect)."""
    h, w = x.shape[-2:]
    pad = (0, -w % multiple, 0, -h % multiple)
    if not any(pad):
        return x
    mode = "reflect" if pad[1] < w and pad[3] < h else "replicate"
    return F.pad(x, pad, mode=mode)


@dataclass
class VAECodec:
    model: object  # diffusers AutoencoderKL, or AutoencoderTiny (a distilled student: no posterior, no tiling)
    device: torch.device
    dtype: torch.dtype  # the encoder's
    decode_dtype: torch.dtype | None = None  # the decoder's; fp32 where an fp16 VAE has force_upcast
    tile_size: int = 256  # tiles hold about tile_size^2 pixels of each layer (see sdvae.tiling)
    max_memory: int | None = None  # bytes of activations before tiles spill to disk; default: 60% of what is free
    # onnxruntime's graphs of `model` (sdvae.onnx.OnnxVAE) as loaded, run by the untiled calls: weights changed in
    # `model` afterwards need a new load_vae (or backend="pytorch")
    graphs: object | None = None

    @property
    def untiled(self):
        """What runs a whole image: the ONNX graphs where load_vae found them exact (the faster CPU path)."""
        return self.graphs or self.model

    def __post_init__(self):
        self.decode_dtype = self.decode_dtype or self.dtype

    @property
    def scaling_factor(self) -> float:
        return self.model.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return getattr(self.model.config, "shift_factor", None) or 0.0

    def _shift_scale(self, z: torch.Tensor):
        """(shift, scale) with scaled = (z - shift) * scale: the scalar factors, or per channel where the config
        has latents_mean/latents_std (Playground v2.5: (z - mean) * scaling_factor / std, as its pipeline does)."""
        mean, std = (getattr(self.model.config, k, None) for k in ("latents_mean", "latents_std"))
        if mean is None or std is None:
            return self.shift_factor, self.scaling_factor
        channel = lambda v: torch.tensor(v, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
        return channel(mean), self.scaling_factor / channel(std)

    @property
    def latents_are_posterior(self) -> bool:
        return latents_are_posterior(self.model)

    def _tile(self, tiled: bool | None, direction: str, shape) -> bool:
        kind = model_kind(self.model)
        whole = {TINY: "a tiny student (AutoencoderTiny)", GRAPHS: "the onnxruntime backend"}.get(kind)
        if whole:  # sdvae.tiling walks AutoencoderKL's blocks; a student needs a few MB per megapixel
            if tiled:
                raise ValueError(f"tiled encode/decode needs a KL VAE run by PyTorch; {whole} runs whole")
            return False
        if tiled is not None:
            return tiled
        budget = self.max_memory or default_budget(self.device)
        dtype = self.dtype if direction == "encode" else self.decode_dtype
        return budget is not None and untiled_bytes(self.model, direction, shape, dtype) > budget

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (B, 3, H, W) batch in [-1, 1], H and W multiples of 8 -> the posterior's (mean, std), unscaled, fp32
        (what a latent cache stores, so that a trainer can draw a new sample every epoch)."""
        mean, logvar = encode_latents(self.untiled, x.to(self.device, self.dtype))
        if logvar is None:  # a tiny student's deterministic encoder: its latents, with no spread
            return mean.float(), torch.zeros_like(mean, dtype=torch.float32)
        return mean.float(), torch.exp(0.5 * logvar.float())  # logvar as every kind returns it: clamped already

    @torch.no_grad()
    def encode(self, images, scaled: bool = True, sample: bool = False, generator: torch.Generator | None = None,
               tiled: bool | None = None, tile_size: int | None = None):
        """Images of one size -> latents (B, C, ceil(H/8), ceil(W/8)); scaled as diffusion models expect
        ((z - shift) * scale, per channel for latents_mean/latents_std configs) unless `scaled=False`; the
        posterior mean unless `sample=True`.
        `tiled`: None tiles only when the untiled pass would not fit in memory; True/False force it. Tiling is
        seam-free: it matches the untiled result up to float rounding (sdvae.tiling)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        check_tile_size(tile_size)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            if images.shape[1] != 3 or 0 in images.shape:
                raise ValueError(f"image batches must be (B, 3, H, W) in [-1, 1], B, H, W >= 1, got {tuple(images.shape)}")
            x = check_range(images)
        else:
            if isinstance(images, (list, tuple)) and not images:
                raise ValueError("encode got no images (an empty list)")
            tensors = [to_tensor(im) for im in (images if isinstance(images, (list, tuple)) else [images])]
            sizes = sorted({tuple(t.shape[-2:]) for t in tensors})
            if len(sizes) > 1:
                raise ValueError(f"encode takes images of one size per call; got sizes (H, W) {sizes}")
            x = torch.stack(tensors)
        x = pad_to_multiple(x).to(self.device, self.dtype)
        if self._tile(tiled, "encode", x.shape):
            moments = tiled_encode(self.model, x, tile_size or self.tile_size, self.max_memory)
        else:
            mean, logvar = encode_latents(self.untiled, x)
            moments = mean if logvar is None else torch.cat([mean, logvar], dim=1)
        if self.latents_are_posterior:
            posterior = DiagonalGaussianDistribution(moments)
            z = posterior.sample(generator=generator) if sample else posterior.mode()
        else:
            z = moments  # a tiny student's deterministic encoder: nothing to sample
        z = z.float()
        if not scaled:
            return z
        shift, scale = self._shift_scale(z)
        return (z - shift) * scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: tuple[int, int] | None = None, tiled: bool | None = None,
               tile_size: int | None = None, scaled: bool = True, output_type: str = "pil"):
        """Latents -> images; `size=(W, H)` crops the encoder's padding back off.
        `tiled`: None tiles only when the untiled pass would not fit in memory; True/False force it (seam-free,
        as in `encode`). output_type: "pil" (list of images), "np" (B, H, W, 3 uint8) or "pt" (B, 3, H, W in
        [-1, 1])."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be pil, np or pt, got {output_type!r}")
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"decode takes a (B, C, h, w) latent tensor, got {type(latents).__name__}")
        channels = self.model.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != channels or 0 in latents.shape:
            raise ValueError(f"latents must be (B, {channels}, h, w) for this VAE, got {tuple(latents.shape)}")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents hold NaN or inf values")
        if size is not None and not (len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise ValueError(f"size must be (width, height), two positive integers, got {size!r}")
        check_tile_size(tile_size)
        z = latents.float()
        if scaled:
            shift, scale = self._shift_scale(z)
            z = z / scale + shift
        z = z.to(self.device, self.decode_dtype)
        if self._tile(tiled, "decode", z.shape):
            x = tiled_decode(self.model, z, tile_size or self.tile_size, self.max_memory)
        else:
            x = decode_latents(self.untiled, z)
        x = x.float().clamp(-1, 1)
        if size is not None:
            x = x[..., : size[1], : size[0]]
        if output_type == "pt":
            return x.cpu()
        array = to_uint8(x)
        return array if output_type == "np" else [Image.fromarray(a) for a in array]


BACKENDS = ("auto", "pytorch", "onnxruntime")


def load_vae(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             channels_last: bool = True, compile: bool = False, tile_size: int = 256,
             max_memory: int | None = None, backend: str | None = None) -> VAECodec:
    """A diffusers folder, a single file, an sdvae run folder, or (with a network) a hub id.

    channels_last (default): convolutions run in NHWC, ~20% faster than NCHW on CPU (eval/bench_inference.py)
    and the layout tensor cores want. `compile`: torch.compile the encoder and decoder (first call slow).

    fp16 honours the config's `force_upcast` as diffusers pipelines do: the decoder then stays fp32 (the SD VAE's
    decoder overflows fp16 at high resolution) while the encoder runs in fp16.

    backend (default: $SDVAE_BACKEND, else "auto"):
    - "auto": on the CPU in fp32 (without `compile`), whole images run through ONNX graphs of the weights that
      onnxruntime executes about 1.2x faster than PyTorch eager; they are exported and checked against PyTorch
      (max abs difference 1e-4) on the first load of each VAE and cached (sdvae.onnx.cached_graphs). Tiled calls, GPUs,
      16-bit dtypes, and installs without the `onnx` extra run PyTorch. A folder of exported graphs runs as
      "onnxruntime".
    - "pytorch": PyTorch only.
    - "onnxruntime": `path` is a folder written by `sdvae export --format onnx`, run on the CPU in fp32
      (untiled)."""
    dtype, device = as_dtype(dtype), as_device(device)
    check_tile_size(tile_size)
    if max_memory is not None and not (isinstance(max_memory, int) and max_memory > 0):
        raise ValueError(f"max_memory must be a positive number of bytes (or None for 60% of free memory), "
                         f"got {max_memory!r}")
    backend = backend or os.environ.get("SDVAE_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime" or (backend == "auto" and is_graph_folder(path)):
        return onnxruntime_codec(path, device, dtype, compile, tile_size, max_memory)
    model = load_pretrained_vae(str(path)).to(device).eval()
    if device.type == "cpu" and dtype != torch.float32 and not cpu_has_fast_16bit():
        warnings.warn(f"{dtype} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native 16-bit "
                      f"arithmetic) is much slower than float32 (eval/results/bench_inference_cpu.md)")
    decode_dtype = dtype
    if dtype == torch.float16 and getattr(model.config, "force_upcast", False):
        model.encoder.to(dtype)  # the decoder keeps its fp32 weights
        if model.quant_conv is not None:  # None where use_quant_conv=False (FLUX.1)
            model.quant_conv.to(dtype)
        decode_dtype = torch.float32
    elif dtype != torch.float32:
        torch.nn.Module.to(model, dtype)  # (diffusers' own .to() warns about an empty fp32 module list)
    graphs = None
    if backend == "auto" and device.type == "cpu" and dtype == torch.float32 and not compile:
        folder = cached_graphs(model)
        graphs = OnnxVAE(folder) if folder else None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.encoder = torch.compile(model.encoder)
        model.decoder = torch.compile(model.decoder)
    return VAECodec(model, device, dtype, decode_dtype, tile_size, max_memory, graphs)


def require_weights(codec: VAECodec, what: str) -> None:
    """Caches and probe results are keyed by the PyTorch weights, which a folder of ONNX graphs does not hold."""
    if model_kind(codec.model) == GRAPHS:
        raise ValueError(f"{what} needs the VAE's weights (a diffusers folder, single file or run), not a folder "
                         f"of ONNX graphs; the default CPU path runs its own graphs of those weights")


def onnxruntime_codec(path, device: torch.device, dtype: torch.dtype, compile: bool, tile_size: int,
                      max_memory: int | None) -> VAECodec:
    if device.type != "cpu" or dtype != torch.float32 or compile:
        raise ValueError("the onnxruntime backend runs on the CPU in fp32, without torch.compile")
    return VAECodec(OnnxVAE(path), device, dtype, dtype, tile_size, max_memory)


def list_inputs(inputs: list, suffixes: tuple, out_suffix: str) -> list[tuple[Path, Path]]:
    """(file, its output's name): the files given, and the files with these suffixes in the folders given (with
    their subfolders, so that files of the same name in two subfolders do not overwrite each other). Names that
    two inputs would share are refused before anything is written."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += [(p, p.relative_to(item).with_suffix(out_suffix)) for p in sorted(item.rglob("*"))
                      if p.suffix.lower() in suffixes and p.is_file()]
        else:
            files.append((item, Path(item.name).with_suffix(out_suffix)))
    if not files:
        raise ValueError(f"no {' / '.join(suffixes)} files in {', '.join(printable(p) for p in inputs)}")
    names = Counter(name for _, name in files)
    clashes = [printable(path) for path, name in files if names[name] > 1]
    if clashes:  # a.png and a.jpg, or two inputs holding the same names: one output would overwrite another
        raise ValueError(f"files that would write the same output: {', '.join(clashes)}")
    return files


def prepare_outputs(files: list[tuple[Path, Path]], out, command: str, overwrite: bool) -> Path:
    """The output folder, refused (before anything is encoded) when it, or one of the files the run would replace,
    holds what sdvae did not write, unless `overwrite`."""
    out = prepare_output_folder(out, command, overwrite)
    foreign = [printable(out / name) for _, name in files if not overwrite and replaces_foreign(out / name)]
    if foreign:
        raise ForeignOutput(f"{len(foreign)} output file(s) exist that sdvae did not write ({', '.join(foreign[:5])}"
                            f"{', ...' if len(foreign) > 5 else ''}); choose another --out or add --overwrite")
    return out


def replaces_foreign(path: Path) -> bool:
    try:
        return path.exists() and not file_is_ours(path)
    except OSError:  # a name the file system refuses: that file is skipped when it is written
        return False


def encode_files(codec: VAECodec, inputs: list, out, scaled: bool = True, tiled: bool | None = None,
                 max_pixels: int | None = None, overwrite: bool = False) -> tuple[int, list]:
    """Each image -> OUT/<name>.safetensors holding `latent` and its original size. A file that cannot be read,
    encoded or written is skipped and returned by name with the reason; the others are encoded."""
    files = list_inputs(inputs, IMAGE_EXTENSIONS, ".safetensors")
    out = prepare_outputs(files, out, "encode", overwrite)
    skipped, done = [], 0
    for path, name in tqdm(files, desc="encode", unit="img"):
        try:
            image = open_image(path, max_pixels)
            z = codec.encode(image, scaled=scaled, tiled=tiled)[0].contiguous()
            meta = {"width": str(image.width), "height": str(image.height), "scaled": str(scaled),
                    "source": printable(path), "sdvae.kind": "latent"}
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out / name, safetensors_bytes({"latent": z}, metadata=meta))
            done += 1
        except Exception as e:  # this file only: the batch goes on
            skipped.append(f"{printable(path)}: {describe_error(e)}")
    return done, skipped


def read_latent_file(path: Path, latent_channels: int) -> tuple[torch.Tensor, tuple[int, int] | None, bool]:
    """(latent (C, h, w), the image's (width, height) or None, scaled) from a file of `encode_files`, checked."""
    require_regular_file(path)
    header = safetensors_header(path)
    if "latent" not in header:
        raise ValueError("not a latent file written by `sdvae encode` (no 'latent' tensor)")
    meta = header.get("__metadata__") or {}
    with text_path(path) as readable, safe_open(readable, "pt") as f:
        z = f.get_tensor("latent")
    if z.ndim != 3 or z.shape[0] != latent_channels or 0 in z.shape or not z.is_floating_point():
        raise ValueError(f"its latent is {tuple(z.shape)} {z.dtype}; this VAE decodes ({latent_channels}, h, w) floats")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("its latent holds NaN or inf values")
    size = None
    if "width" in meta or "height" in meta:
        try:
            size = (int(meta["width"]), int(meta["height"]))
        except (KeyError, ValueError):
            raise ValueError(f"its stored size is incomplete or not whole numbers: width {meta.get('width')!r}, "
                             f"height {meta.get('height')!r}") from None
        if not (0 < size[0] <= 8 * z.shape[2] and 0 < size[1] <= 8 * z.shape[1]):
            raise ValueError(f"its stored size {size[0]}x{size[1]} does not fit its {z.shape[2]}x{z.shape[1]} latent")
    if meta.get("scaled", "True") not in ("True", "False"):
        raise ValueError(f"its 'scaled' entry must be True or False, got {meta['scaled']!r}")
    return z, size, meta.get("scaled", "True") == "True"


def decode_files(codec: VAECodec, inputs: list, out, tiled: bool | None = None,
                 overwrite: bool = False) -> tuple[int, list]:
    """OUT/<name>.png for each latent file written by `encode_files` (in the same subfolders), at the image's
    original size. A file that is not such a latent file, or holds bad values, is skipped and returned by name."""
    files = list_inputs(inputs, (".safetensors",), ".png")
    out = prepare_outputs(files, out, "decode", overwrite)
    skipped, done = [], 0
    for path, name in tqdm(files, desc="decode", unit="img"):
        try:
            z, size, scaled = read_latent_file(path, codec.model.config.latent_channels)
            image = codec.decode(z[None], size=size, tiled=tiled, scaled=scaled)[0]
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out / name, png_bytes(image))
            done += 1
        except Exception as e:
            skipped.append(f"{printable(path)}: {describe_error(e)}")
    return done, skipped
