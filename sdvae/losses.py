"""Autoencoder loss: reconstruction + LPIPS + KL, on the latent-diffusion scale.

LDM's `LPIPSWithDiscriminator` sums every term over elements and divides by the batch size:
    sum(|x - x_hat| + perceptual_weight * lpips(x, x_hat)) / B + kl_weight * sum(KL) / B
where the per-image LPIPS value is added to each of the 3*H*W pixel terms. We divide that whole
expression by 3*H*W, so the logged numbers are per-pixel means, while `kl_weight` and
`perceptual_weight` weigh the terms against each other exactly as in LDM (kl_weight=1e-6 is KL-f8's).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F

from .downloads import LPIPS_TRUNKS, TRUNK_NAMES, MissingWeightsError, weights_file
from .weights import read_state_dict

TRAIN_HINT = ", or set lpips_vgg_weights=/path/to/{name}, or set perceptual_weight=0"


def load_trunk_features(net: str = "vgg", path: str | Path | None = None, download: bool = True,
                        hint: str = TRAIN_HINT) -> dict:
    """The `features.*` tensors of torchvision's ImageNet VGG16 or AlexNet, from `path` or the torch hub cache."""
    url = LPIPS_TRUNKS[net]
    what = f"{TRUNK_NAMES[net]} ImageNet weights for LPIPS"
    path = weights_file(url, path, download, what, hint.format(name=Path(url).name))
    features = {k[len("features."):]: v for k, v in read_state_dict(path).items() if k.startswith("features.")}
    if not features:
        raise MissingWeightsError(f"{path} holds no {TRUNK_NAMES[net]} 'features.*' weights")
    return features


def load_vgg16_features(path: str | Path | None = None, download: bool = True) -> dict:
    return load_trunk_features("vgg", path, download)


def build_lpips(vgg_weights: str | Path | None = None, download: bool = True, pretrained_trunk: bool = True,
                net: str = "vgg", hint: str = TRAIN_HINT):
    """LPIPS (VGG by default, or `net="alex"`), frozen and in eval mode; gradients still flow through it to
    its inputs. `vgg_weights`: the trunk's weights file (for `net="alex"`, AlexNet's).

    The linear calibration layers ship inside the lpips package; only the trunk needs a download.
    `pretrained_trunk=False` keeps a random trunk (tests, offline smoke runs).
    """
    features = load_trunk_features(net, vgg_weights, download, hint) if pretrained_trunk else None
    with warnings.catch_warnings():  # lpips builds its trunk with torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if features is not None:
        # lpips cuts the torchvision `features` into slices but keeps each layer's index as its name
        trunk = {}
        for name in model.net.state_dict():
            index = name.split(".", 1)[1]  # "slice1.0.weight" -> "0.weight"
            if index not in features:
                raise MissingWeightsError(f"{TRUNK_NAMES[net]} weights lack 'features.{index}'")
            trunk[name] = features[index]
        model.net.load_state_dict(trunk)
    return model.eval().requires_grad_(False)


class AutoencoderLoss(torch.nn.Module):
    def __init__(self, rec_loss: str = "l1", perceptual_weight: float = 1.0, kl_weight: float = 1e-6, lpips_model=None,
                 equivariance_weight: float = 0.0, latent_weight: float = 1.0):
        super().__init__()
        if rec_loss not in ("l1", "mse"):
            raise ValueError(f"rec_loss must be l1 or mse, got {rec_loss!r}")
        if perceptual_weight > 0 and lpips_model is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS model")
        self.rec_loss = rec_loss
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight
        self.equivariance_weight = equivariance_weight
        self.latent_weight = latent_weight
        self.lpips = lpips_model if perceptual_weight > 0 else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()  # frozen network: dropout and norms stay in inference mode
        return self

    def forward(self, x: torch.Tensor, reconstruction: torch.Tensor, kl: torch.Tensor, logvar=None,
                equivariant: tuple | None = None, latent_error: torch.Tensor | None = None):
        """x, reconstruction in [-1, 1], (B, 3, H, W); kl: (B,) KL summed over each image's latent;
        logvar: LDM's learned scalar output log-variance, or None; equivariant: (decode(T(z)), T(x)) on a step with
        the equivariance term, whose reconstruction + perceptual loss (a per-pixel mean at its own size, so on the
        scale of the rest) enters with equivariance_weight; kl None and latent_error (a distilled student's encoder
        MSE against the teacher's latents, per element) with latent_weight in its place.

        Returns (loss, nll, logs); nll (reconstruction + perceptual, through the log-variance) is what the
        adversarial weight is balanced against.
        """
        logs = {"kl": kl.detach().float().mean()} if kl is not None else {}
        nll = self.image_terms(x, reconstruction, logs)
        if equivariant is not None:
            term = self.image_terms(equivariant[1], equivariant[0], {})
            logs["equivariance_loss"] = term.detach()
            nll = nll + self.equivariance_weight * term
        if logvar is not None:  # per element: (rec + pw * lpips) / exp(logvar) + logvar
            nll = nll / torch.exp(logvar.float()) + logvar.float()
            logs["logvar"] = logvar.detach().float()
        elements_per_image = x[0].numel()  # 3*H*W: the LDM sums are divided by this
        loss = nll + self.kl_weight * kl.float().mean() / elements_per_image if kl is not None else nll
        if latent_error is not None:  # touches the student's encoder only, which nothing else trains
            logs["latent_loss"] = latent_error.detach()
            loss = loss + self.latent_weight * latent_error
        logs["nll"] = nll.detach()
        logs["loss"] = loss.detach()
        return loss, nll, logs

    def image_terms(self, x: torch.Tensor, reconstruction: torch.Tensor, logs: dict) -> torch.Tensor:
        """Reconstruction + perceptual_weight x LPIPS, per-pixel means; their values go into `logs`."""
        x, reconstruction = x.float(), reconstruction.float()
        rec = F.l1_loss(reconstruction, x) if self.rec_loss == "l1" else F.mse_loss(reconstruction, x)
        logs["rec_loss"] = rec.detach()
        if self.lpips is None:
            return rec
        perceptual = self.lpips(reconstruction, x).mean()
        logs["perceptual_loss"] = perceptual.detach()
        return rec + self.perceptual_weight * perceptual
