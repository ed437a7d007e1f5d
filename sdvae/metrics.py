"""Reconstruction metrics on 8-bit images, as the published VAE tables compute them.

PSNR and SSIM are batched torch code (CPU or GPU, float64) so that `sdvae eval` and training validation
share one implementation; tests check both against scikit-image's reference functions. rFID uses the FID
Inception network of pytorch-fid and its definition of the Frechet distance.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .images import tensor_to_pixels

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, clamped and rounded like a saved PNG."""
    return tensor_to_pixels(x).permute(0, 2, 3, 1).cpu().numpy()


def _nchw(images) -> torch.Tensor:
    """(B, H, W, 3) uint8 arrays or (B, 3, H, W) tensors of 0-255 values -> (B, 3, H, W) float64."""
    if isinstance(images, np.ndarray):
        images = torch.tensor(images).permute(0, 3, 1, 2)  # a copy: PIL's arrays are read-only
    return images.double()


def psnr_batch(a, b) -> torch.Tensor:
    """(B,) PSNR in dB of 8-bit image batches, peak 255; inf where the images are identical."""
    a = _nchw(a)
    b = _nchw(b).to(a.device)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def _gaussian_window(device, sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-x**2 / (2 * sigma**2))
    return w / w.sum()


def ssim_batch(a, b) -> torch.Tensor:
    """(B,) SSIM of 8-bit image batches (Wang et al. 2004): on [0, 1], 11x11 Gaussian window (sigma 1.5),
    K1 0.01, K2 0.03, population covariances, per channel then averaged. Only windows that lie inside the
    image count, as scikit-image's `structural_similarity(gaussian_weights=True)` (it filters the whole image
    and crops the 5-pixel border), so the two agree to float rounding."""
    a = _nchw(a)
    x, y = a / 255, _nchw(b).to(a.device) / 255
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    w = _gaussian_window(x.device)
    rows, cols = w.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), w.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(t):  # separable Gaussian, 'valid' windows only
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean((2, 3)).mean(1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 (H, W, 3) images, peak 255."""
    return float(psnr_batch(a[None], b[None])[0])


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 (H, W, 3) images (see `ssim_batch`)."""
    return float(ssim_batch(a[None], b[None])[0])


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """Encode with the posterior mode (a tiny student: its latents) and decode: how reconstructions are scored."""
    from .models import latent_mode

    return vae.decode(latent_mode(vae, x)).sample


def score(inputs: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, list[float]]:
    a, b = to_uint8(inputs), to_uint8(reconstructions)
    return {"psnr": psnr_batch(a, b).tolist(), "ssim": ssim_batch(a, b).tolist()}


def summarise(values: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for name, v in values.items():
        out[f"{name}_mean"] = float(np.mean(v))
        out[f"{name}_std"] = float(np.std(v))
    out["images"] = len(next(iter(values.values()), []))
    return out


def label_font(size: int = 11):
    """Pillow's default font at `size` px (a fixed-size bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def fit_text(text: str, width: float, font) -> str:
    """`text` cut (ending '..') to at most `width` px in `font`."""
    if font.getlength(text) <= width:
        return text
    while len(text) > 1 and font.getlength(text + "..") > width:
        text = text[:-1]
    return text.rstrip() + ".."


def caption(texts, width: float, font) -> str:
    """The first of `texts` (longest first) that fits in `width` px, else the last one cut to fit."""
    return next((t for t in texts if font.getlength(t) <= width), None) or fit_text(texts[-1], width, font)


def wrap(text: str, width: float, font) -> list[str]:
    """`text` in lines at most `width` px wide: broken at spaces, a word too long for a line cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return [fit_text(line, width, font) for line in lines] or [""]


def line_height(font) -> int:
    return font.getbbox("Ag|")[3] + 2


def label_band(labels, width: int, font=None) -> Image.Image:
    """A white band `width` px wide with each (x, w, text) of `labels` wrapped into the w px from x on, as tall
    as the longest text needs."""
    font = font or label_font()
    lines = [wrap(text, w - 4, font) for _, w, text in labels]
    step = line_height(font)
    band = Image.new("RGB", (width, 4 + step * max((len(ls) for ls in lines), default=1)), "white")
    draw = ImageDraw.Draw(band)
    for (x, _, _), ls in zip(labels, lines):
        for k, line in enumerate(ls):
            draw.text((x + 2, 2 + k * step), line, fill="black", font=font)
    return band


def stack(*pictures: Image.Image) -> Image.Image:
    """Pictures one below the other, left-aligned, on white."""
    figure = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    y = 0
    for p in pictures:
        figure.paste(p.convert("RGB"), (0, y))
        y += p.height
    return figure


def colour_legend(width: int, cmap: str, font, text: str, height: int = 10) -> Image.Image:
    """A colour bar from the colour for 0 (left) to full colour (right), `text` saying what they mean, below it."""
    from matplotlib import colormaps

    bar = (colormaps[cmap](np.linspace(0, 1, width))[None, :, :3].repeat(height, 0) * 255).astype(np.uint8)
    space = Image.new("RGB", (width, 4), "white")
    return stack(space, Image.fromarray(bar), label_band([(0, width, text)], width, font))


def comparison_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, columns: int = 4) -> Image.Image:
    """Pairs (input | reconstruction) laid out `columns` pairs per row, the columns labelled above."""
    a, b = to_uint8(inputs), to_uint8(reconstructions)
    pairs = [np.concatenate([x, y], axis=1) for x, y in zip(a, b)]
    columns = min(columns, len(pairs))
    while len(pairs) % columns:
        pairs.append(np.full_like(pairs[0], 255))
    rows = [np.concatenate(pairs[i:i + columns], axis=1) for i in range(0, len(pairs), columns)]
    w, font = a.shape[2], label_font()
    output = caption(("reconstruction", "recon.", "rec"), w - 4, font)
    labels = [(k * w, w, output if k % 2 else "input") for k in range(2 * columns)]
    return stack(label_band(labels, 2 * columns * w), Image.fromarray(np.concatenate(rows, axis=0)))


def error_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, min_side: int = 384,
               gain: float = 4.0) -> Image.Image:
    """One row per image: input | reconstruction | error (mean |difference| over the channels, x `gain`, as a
    heat map). Small images are enlarged by an integer factor (nearest) to at least `min_side`, so detail shows."""
    from matplotlib import colormaps

    a, b = to_uint8(inputs), to_uint8(reconstructions)
    error = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=-1) / 255 * gain
    heat = (colormaps["inferno"](np.clip(error, 0, 1))[..., :3] * 255).astype(np.uint8)
    zoom = max(1, -(-min_side // max(a.shape[1], a.shape[2])))
    gap = np.full((a.shape[1] * zoom, 4, 3), 255, np.uint8)
    rows = []
    for panels in zip(a, b, heat):
        large = [p.repeat(zoom, axis=0).repeat(zoom, axis=1) for p in panels]
        rows += [np.concatenate([large[0], gap, large[1], gap, large[2]], axis=1),
                 np.full((4, 3 * a.shape[2] * zoom + 8, 3), 255, np.uint8)]
    return Image.fromarray(np.concatenate(rows[:-1], axis=0))


def error_figure(inputs: torch.Tensor, reconstructions: torch.Tensor, min_side: int = 384,
                 gain: float = 4.0) -> Image.Image:
    """error_grid with its columns labelled above and the heat map's scale below (reconstructions.png)."""
    grid = error_grid(inputs, reconstructions, min_side, gain)
    side = (grid.width - 8) // 3
    titles = ("input", "reconstruction", "error |reconstruction - input|")
    font = label_font(max(11, min(16, side // 24)))
    band = label_band([(k * (side + 4), side, t) for k, t in enumerate(titles)], grid.width, font)
    legend = colour_legend(side, "inferno", font, f"error heat map: black 0, full colour {1 / gain:.3g} or more (mean "
                                            f"|difference| over RGB, pixels on [0, 1]; {255 / gain:.0f} of 255 levels)")
    corner = Image.new("RGB", (grid.width, legend.height), "white")
    corner.paste(legend, (2 * (side + 4), 0))
    return stack(band, grid, corner)


# --- rFID ---------------------------------------------------------------------------------------------------

@contextmanager
def _fid_weights_from(path: Path):
    """pytorch-fid fetches its weights by URL inside InceptionV3's constructor; hand it our file instead."""
    import pytorch_fid.inception as inception

    original = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *args, **kwargs: torch.load(path, map_location="cpu",
                                                                            weights_only=True)
    try:
        yield
    finally:
        inception.load_state_dict_from_url = original


def build_fid_inception(path: str | Path | None = None, download: bool = True, hint: str = ""):
    """pytorch-fid's InceptionV3 (the TF FID network) returning the 2048-d pool features of images in [0, 1]
    (resized to 299 bilinearly inside, as pytorch-fid does). Weights from `path` (file or folder), the torch hub
    cache, or a download; MissingWeightsError names the file and where it was looked for."""
    from pytorch_fid.inception import InceptionV3

    from .losses import weights_file

    file = weights_file(FID_WEIGHTS_URL, path, download, "FID Inception weights (pytorch-fid)", hint)
    with _fid_weights_from(file):
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def inception_features(model, images) -> np.ndarray:
    """(B, H, W, 3) uint8 or (B, 3, H, W) 0-255 -> (B, 2048) float64 features (pytorch-fid's input: x / 255)."""
    device = next(model.parameters()).device
    x = _nchw(images).float().to(device) / 255
    return model(x)[0].flatten(1).double().cpu().numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (sample) covariance of (N, D) features, as pytorch-fid computes them."""
    if len(features) < 2:
        raise ValueError(f"rFID needs at least 2 images, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy's sqrtm as pytorch-fid.

    Where S1 S2 is too singular for sqrtm, eps is added to both diagonals, as in pytorch-fid. The imaginary part
    sqrtm leaves on nearly singular products (few images) is rounding noise and is dropped (pytorch-fid raises
    when it exceeds 1e-3 on the diagonal, which with few images says nothing about the VAE).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "singular / ill-conditioned": expected with fewer images than dimensions
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between two (N, D) feature sets, each as a Gaussian (mean, sample covariance).

    With fewer images than dimensions (Kodak's 24 in Inception's 2048) both covariances live in the span of
    the centred features, and Tr sqrtm(S1 S2) is the same computed in an orthonormal basis of that span: the
    same value as in 2048 dimensions, but sqrtm of a matrix of the size of the image count (milliseconds
    instead of ~20 s on 2 CPU cores). With more images it is the 2048-d computation of pytorch-fid."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    c1, c2 = real - mu1, fake - mu2
    if len(real) + len(fake) < real.shape[1]:
        basis, _ = np.linalg.qr(np.concatenate([c1, c2]).T)  # (D, N1 + N2), orthonormal columns
        c1, c2 = c1 @ basis, c2 @ basis
    for c in (c1, c2):
        if len(c) < 2:
            raise ValueError(f"rFID needs at least 2 images, got {len(c)}")
    s1, s2 = c1.T @ c1 / (len(c1) - 1), c2.T @ c2 / (len(c2) - 1)
    diff = mu1 - mu2
    return float(diff @ diff) + frechet_distance(np.zeros(len(s1)), s1, np.zeros(len(s2)), s2)
