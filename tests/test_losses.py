import pytest
import torch
import torchvision

from sdvae.losses import AutoencoderLoss, build_lpips, load_vgg16_features
from sdvae.downloads import MissingWeightsError
from sdvae.models import VAETrainingForward, build_vae


def test_kl_term_is_the_closed_form_on_the_ldm_scale():
    """With x == reconstruction only the KL remains: kl_weight * sum(KL) / B, divided by 3*H*W."""
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    loss, _, logs = AutoencoderLoss("l1", 0.0, kl_weight=1e-3)(x, x.clone(), kl)
    expected = 1e-3 * kl.sum() / 2 / (3 * 16 * 16)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["kl"], kl.mean())


@pytest.mark.parametrize("rec_loss", ["l1", "mse"])
def test_loss_weighs_terms_exactly_as_ldm(rec_loss, random_lpips):
    """LDM: sum(|x - x_hat| + pw * lpips) / B + kl_weight * sum(KL) / B. Ours is that divided by 3*H*W."""
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    kl = torch.tensor([1500.0, 2500.0])
    pw, kw = 0.7, 1e-6
    loss, _, _ = AutoencoderLoss(rec_loss, pw, kw, random_lpips)(x, y, kl)
    rec = (x - y).abs() if rec_loss == "l1" else (x - y) ** 2
    p = random_lpips(y, x)  # (B, 1, 1, 1): added to every pixel's term
    ldm = (rec + pw * p).sum() / 2 + kw * kl.sum() / 2
    torch.testing.assert_close(loss * 3 * 32 * 32, ldm, rtol=1e-5, atol=1e-5)


def decoder_grads(perceptual_weight, lpips_model):
    torch.manual_seed(0)
    vae = build_vae("tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstruction, kl = VAETrainingForward(vae)(x)[:2]
    loss, _, _ = AutoencoderLoss("l1", perceptual_weight, 1e-6, lpips_model)(x, reconstruction, kl)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in vae.decoder.parameters()])


def test_lpips_gradient_reaches_the_decoder(random_lpips):
    without = decoder_grads(0.0, None)
    with_lpips = decoder_grads(1.0, random_lpips)
    assert not torch.allclose(without, with_lpips)
    assert all(p.grad is None for p in random_lpips.parameters())  # frozen: no gradients of its own
    assert not random_lpips.training


def test_missing_vgg_weights_name_the_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeightsError) as e:
        load_vgg16_features()
    message = str(e.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "torch") in message and "perceptual_weight=0" in message
    with pytest.raises(MissingWeightsError, match="my-vgg.pth"):
        load_vgg16_features(tmp_path / "my-vgg.pth")


@pytest.mark.slow
def test_lpips_loads_vgg_weights_from_the_torch_cache(tmp_path, monkeypatch):
    """A VGG16 file in the real torchvision format (random init) is found in the hub cache and used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    features = torchvision.models.vgg16().features.state_dict()
    path = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    path.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    model = build_lpips(download=False)
    torch.testing.assert_close(model.net.slice1[0].weight, features["0.weight"])
    torch.testing.assert_close(getattr(model.net.slice5, "28").bias, features["28.bias"])
    assert not any(p.requires_grad for p in model.parameters())


def test_learned_logvar_scales_the_nll_as_ldm():
    x, y = torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5)
    logvar = torch.tensor(0.7, requires_grad=True)
    loss, nll, logs = AutoencoderLoss("l1", 0.0, 0.0)(x, y, torch.zeros(1), logvar)
    torch.testing.assert_close(nll, 0.5 / torch.exp(torch.tensor(0.7)) + 0.7)
    loss.backward()
    assert logvar.grad is not None and logs["logvar"] == 0.7
