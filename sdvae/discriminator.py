"""The PatchGAN discriminator and the adversarial terms of latent-diffusion's LPIPSWithDiscriminator."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN: 4x4 convs, LeakyReLU 0.2; outputs a map of logits, one per overlapping patch.

    norm="batch" is LDM's; "group" needs no statistics shared between processes.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"disc_norm must be batch or group, got {norm!r}")

        def norm_layer(channels):
            return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(32, channels)

        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1, bias=False), norm_layer(out), nn.LeakyReLU(0.2, True)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """Logits for x; for (x, y) a pair, each through its own pass as LDM does (batch-norm statistics
        are never mixed between real and reconstructed images), in one call so DDP sees one forward."""
        return self.main(x) if y is None else (self.main(x), self.main(y))


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "vanilla":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"disc_loss must be hinge or vanilla, got {kind!r}")


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def generator_term(disc: nn.Module, reconstruction, nll, last_layer, disc_weight: float):
    """disc_weight * adaptive weight * g_loss. `disc` is the unwrapped discriminator, frozen for this pass so
    that the generator loss never reaches its gradients."""
    max_weight = 1e4 / reconstruction[0].numel()  # LDM's clamp, on our loss scale (LDM's / 3*H*W)
    disc.requires_grad_(False)
    try:
        g_loss = generator_loss(disc(reconstruction))
    finally:
        disc.requires_grad_(True)  # the graph above was built without its parameters
    weight = disc_weight * adaptive_weight(nll, g_loss, last_layer, max_weight)
    return weight * g_loss, {"g_loss": g_loss.detach(), "adaptive_weight": weight}


def discriminator_term(disc: nn.Module, x: torch.Tensor, reconstruction: torch.Tensor, kind: str = "hinge"):
    """The discriminator's loss on real images and DETACHED reconstructions: nothing reaches the VAE."""
    logits_real, logits_fake = disc(x.detach(), reconstruction.detach())
    d_loss = discriminator_loss(logits_real, logits_fake, kind)
    return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                    "logits_fake": logits_fake.detach().mean()}


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float) -> torch.Tensor:
    """||grad nll|| / (||grad g_loss|| + 1e-4) at the decoder's last layer, clamped and detached (LDM).

    Our nll is LDM's divided by 3*H*W, which divides this ratio by the same factor: the caller passes
    max_weight = 1e4 / (3*H*W) so the clamp sits where LDM's does.
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
