"""Pixels: image files to 8-bit RGB the way a viewer shows them, 8-bit pixels <-> [-1, 1] tensors, the photos
scikit-image ships, and the two resize-and-crop protocols (training crops at native scale; the evaluation protocol of the published tables).

Every image becomes 8-bit RGB the way a viewer would show it: EXIF rotation applied, transparency composited on
white, 16-bit scaled down, float images clipped to [0, 1], CMYK and palettes converted.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from .config import MAX_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageTooLarge(ValueError):
    pass


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. Loads the pixels, so truncated files raise here."""
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit greyscale: PIL's own convert("L") clips instead of scaling. Float images are [0, 1]
        # with out-of-range values clipped, as viewers show them
        a = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        peak = 1.0 if image.mode == "F" else 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        # palettes, and PNG's colour-keyed transparency (tRNS) on L / RGB: the transparent pixels become alpha
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return image


def open_image(source, max_pixels: int | None = None) -> Image.Image:
    """A path, bytes, a `datasets` image dict or a PIL image -> RGB PIL image. Paths must be regular files (a FIFO
    would block for ever); images over `max_pixels` (default MAX_PIXELS) are refused before they are decoded."""
    if isinstance(source, dict):  # datasets.Image(decode=False)
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        require_regular_file(source)
    limit = max_pixels or MAX_PIXELS
    with warnings.catch_warnings():  # our limit replaces PIL's warning (PIL still refuses twice its own limit)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = source if isinstance(source, Image.Image) else Image.open(source)
        try:
            if image.width * image.height > limit:
                raise ImageTooLarge(f"{image.width}x{image.height} is over max_pixels ({limit:,}); raise "
                                    f"max_pixels to read it")
            return to_rgb(image)
        finally:
            if image is not source:
                image.close()


def require_regular_file(path) -> None:
    mode = os.stat(path).st_mode  # FileNotFoundError names the path
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file (a pipe, device or socket is never read)")


def pixels_to_tensor(pixels) -> torch.Tensor:
    """8-bit pixels -> floats in [-1, 1]: a PIL image or an (H, W, 3) array gives (3, H, W); a (B, H, W, 3) uint8
    array or a (..., 3, H, W) uint8 tensor gives the same layout as a tensor ((B, 3, H, W) for arrays)."""
    if isinstance(pixels, Image.Image):
        pixels = np.array(pixels)
    if isinstance(pixels, np.ndarray):
        writable = pixels.flags.writeable and pixels.flags.c_contiguous  # PIL's arrays are read-only views
        pixels = torch.from_numpy(pixels if writable else np.array(pixels)).movedim(-1, -3)
    return pixels.float() / 127.5 - 1


def tensor_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 0-255, clamped and rounded as a saved PNG would be (same layout)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def png_bytes(image: Image.Image) -> bytes:
    """A PNG in memory, for atomic_write: the file on disk is then whole or absent. Tagged Software=sdvae, which
    tells a later run that it may replace the file (sdvae.files.refuse_foreign_output)."""
    info = PngInfo()
    info.add_text("Software", "sdvae")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def resize_crop(image: Image.Image, resolution: int, protocol: str,
                random_crop: torch.Generator | None = None) -> Image.Image:
    """A `resolution` square, by one of two protocols:
    - "train": native scale (upscaled, bicubic, only when the shorter side is smaller), cropped where the generator
      `random_crop` draws, or in the centre. Training crops and training's validation PSNR use it.
    - "eval": the shorter side resized to `resolution` (bicubic), the centre square: the protocol of the published
      tables (sd-vae-ft-mse's model card), used by `sdvae eval` and `stats`.
    """
    if protocol not in ("train", "eval"):
        raise ValueError(f"protocol must be train or eval, got {protocol!r}")
    scale = resolution / min(image.size)
    if scale > 1 or protocol == "eval" and scale != 1:
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    free = (image.width - resolution, image.height - resolution)
    if random_crop is not None:
        left, top = (int(torch.randint(n + 1, (1,), generator=random_crop)) for n in free)
    else:
        left, top = free[0] // 2, free[1] // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_photo(name: str) -> np.ndarray:
    """A natural photo scikit-image ships (HxWx3 uint8): sdvae's embedded images, offline."""
    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, clamped and rounded like a saved PNG."""
    return tensor_to_pixels(x).permute(0, 2, 3, 1).cpu().numpy()
