"""Autoencoder loss: reconstruction + LPIPS + KL, on the latent-diffusion scale.

LDM's `LPIPSWithDiscriminator` sums every term over elements and divides by the batch size:
    sum(|x - x_hat| + perceptual_weight * lpips(x, x_hat)) / B + kl_weight * sum(KL) / B
where the per-image LPIPS value is added to each of the 3*H*W pixel terms. We divide that whole
expression by 3*H*W, so the logged numbers are per-pixel means, while `kl_weight` and
`perceptual_weight` weigh the terms against each other exactly as in LDM (kl_weight=1e-6 is KL-f8's).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


class MissingWeightsError(RuntimeError):
    pass


def vgg16_cache_path() -> Path:
    """Where torchvision (and so lpips) keeps the VGG16 ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_URL).name


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_vgg16_features(path: str | Path | None = None, download: bool = True) -> dict:
    """The `features.*` tensors of torchvision's ImageNet VGG16, from `path` or the torch hub cache."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError(f"VGG16 weights for LPIPS not found: {path}")
    else:
        path = vgg16_cache_path()
        if not path.is_file():
            if not download:
                raise MissingWeightsError(_missing_message(path, "downloads are off"))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(VGG16_URL, str(path), progress=True)
            except Exception as e:  # no network, proxy, disk: all end the same way for the user
                raise MissingWeightsError(_missing_message(path, f"download failed: {e}")) from None
    state = _read_state_dict(path)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise MissingWeightsError(f"{path} holds no VGG16 'features.*' weights")
    return features


def _missing_message(path: Path, why: str) -> str:
    return (f"LPIPS needs the VGG16 ImageNet weights '{path.name}', which are not in the torch hub cache "
            f"({path}) and could not be fetched ({why}). Download {VGG16_URL} to that path, "
            f"or set lpips_vgg_weights=/path/to/{path.name}, or set perceptual_weight=0.")


def build_lpips(vgg_weights: str | Path | None = None, download: bool = True, pretrained_trunk: bool = True):
    """LPIPS-VGG, frozen and in eval mode; gradients still flow through it to its inputs.

    The linear calibration layers ship inside the lpips package; only the VGG trunk needs a download.
    `pretrained_trunk=False` keeps a random trunk (tests, offline smoke runs).
    """
    import lpips

    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if pretrained_trunk:
        features = load_vgg16_features(vgg_weights, download)
        # lpips cuts vgg16.features into slices but keeps each layer's index as its name
        trunk = {}
        for name in model.net.state_dict():
            index = name.split(".", 1)[1]  # "slice1.0.weight" -> "0.weight"
            if index not in features:
                raise MissingWeightsError(f"VGG16 weights lack 'features.{index}'")
            trunk[name] = features[index]
        model.net.load_state_dict(trunk)
    return model.eval().requires_grad_(False)


class AutoencoderLoss(torch.nn.Module):
    def __init__(self, rec_loss: str = "l1", perceptual_weight: float = 1.0, kl_weight: float = 1e-6, lpips_model=None):
        super().__init__()
        if rec_loss not in ("l1", "mse"):
            raise ValueError(f"rec_loss must be l1 or mse, got {rec_loss!r}")
        if perceptual_weight > 0 and lpips_model is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS model")
        self.rec_loss = rec_loss
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight
        self.lpips = lpips_model if perceptual_weight > 0 else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()  # frozen network: dropout and norms stay in inference mode
        return self

    def forward(self, x: torch.Tensor, reconstruction: torch.Tensor, kl: torch.Tensor, logvar=None):
        """x, reconstruction in [-1, 1], (B, 3, H, W); kl: (B,) KL summed over each image's latent;
        logvar: LDM's learned scalar output log-variance, or None.

        Returns (loss, nll, logs); nll (reconstruction + perceptual, through the log-variance) is what the
        adversarial weight is balanced against.
        """
        x, reconstruction = x.float(), reconstruction.float()
        if self.rec_loss == "l1":
            rec = F.l1_loss(reconstruction, x)
        else:
            rec = F.mse_loss(reconstruction, x)
        logs = {"rec_loss": rec.detach(), "kl": kl.detach().float().mean()}
        nll = rec
        if self.lpips is not None:
            perceptual = self.lpips(reconstruction, x).mean()
            nll = nll + self.perceptual_weight * perceptual
            logs["perceptual_loss"] = perceptual.detach()
        if logvar is not None:  # per element: (rec + pw * lpips) / exp(logvar) + logvar
            nll = nll / torch.exp(logvar.float()) + logvar.float()
            logs["logvar"] = logvar.detach().float()
        elements_per_image = x[0].numel()  # 3*H*W: the LDM sums are divided by this
        loss = nll + self.kl_weight * kl.float().mean() / elements_per_image
        logs["nll"] = nll.detach()
        logs["loss"] = loss.detach()
        return loss, nll, logs
