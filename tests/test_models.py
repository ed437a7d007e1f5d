import pytest
import torch

from sdvae.models import VAETrainingForward, build_vae, count_parameters
from sdvae.presets import PRESETS


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_latents_are_8x_downsampled(preset):
    vae = build_vae(preset).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        assert posterior.mean.shape == (2, 16 if preset.endswith("16ch") else 4, 8, 12)
        assert vae.decode(posterior.mode()).sample.shape == x.shape


def test_sd_kl_f8_has_the_stable_diffusion_vae_parameter_counts():
    vae = build_vae("sd-kl-f8")
    assert count_parameters(vae.encoder) == 34_163_592
    assert count_parameters(vae.decoder) == 49_490_179
    assert count_parameters(vae) == 34_163_592 + 49_490_179 + 72 + 20  # + quant_conv, post_quant_conv
    assert vae.config.scaling_factor == 0.18215


def test_model_can_be_a_diffusers_config(tmp_path):
    build_vae("tiny").save_config(tmp_path)
    assert list(build_vae(str(tmp_path)).config.block_out_channels) == [32, 64, 128, 128]
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        build_vae(str(tmp_path / "nope"))


@pytest.mark.slow
def test_training_forward_returns_reconstruction_and_per_image_kl():
    vae = build_vae("tiny")
    x = torch.randn(3, 3, 32, 32)
    reconstruction, kl = VAETrainingForward(vae)(x)[:2]
    assert reconstruction.shape == x.shape and kl.shape == (3,)
    moments = vae.quant_conv(vae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    closed_form = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl, closed_form, rtol=1e-5, atol=1e-4)
    a = VAETrainingForward(vae)(x, noise_seed=7)[0]
    b = VAETrainingForward(vae)(x, noise_seed=7)[0]
    c = VAETrainingForward(vae)(x, noise_seed=8)[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, reconstruction)
