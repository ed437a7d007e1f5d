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
import pytorch_fid.inception as inception
import torch
import torch.nn.functional as F
from pytorch_fid.inception import InceptionV3
from scipy import linalg

from .downloads import FID_WEIGHTS_URL, weights_file
from .images import to_uint8
from .weights import decode_latents, latent_mode


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
    return decode_latents(vae, latent_mode(vae, x))


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


# --- rFID ---------------------------------------------------------------------------------------------------

@contextmanager
def _fid_weights_from(path: Path):
    """pytorch-fid fetches its weights by URL inside InceptionV3's constructor; hand it our file instead."""
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
