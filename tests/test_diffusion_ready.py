"""Training latents for diffusion: the equivariance term, the 16-channel presets, factors measured at the end."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from sdvae.cache_reader import LatentShards
from sdvae.cli import main
from sdvae.config import load_config
from sdvae.equivariance import Equivariance, Transform
from sdvae.losses import AutoencoderLoss
from sdvae.models import VAETrainingForward, build_vae, count_parameters
from sdvae.train import train
from tests.test_train import config

# stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json (FLUX.1's differs only in its factors)
SD3_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 16,
    "latents_mean": None, "latents_std": None, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}


def test_the_transform_is_the_same_on_the_latent_and_on_the_image():
    t = Transform((3, 5), 1)
    assert t.apply(torch.full((1, 4, 8, 12), 0.7)).shape == (1, 4, 5, 3)  # a quarter turn swaps the sides
    assert torch.allclose(t.apply(torch.full((1, 4, 8, 12), 0.7)), torch.tensor(0.7))  # constant stays constant
    assert torch.allclose(t.apply(torch.full((1, 3, 64, 96), -0.3), 8), torch.tensor(-0.3))
    assert t.apply(torch.zeros(1, 3, 64, 96), 8).shape == (1, 3, 40, 24)
    x = torch.randn(2, 3, 16, 24)
    turned = x
    for _ in range(4):
        turned = Transform((16, 24) if turned.shape[-2] == 16 else (24, 16), 1).apply(turned)
    assert torch.equal(turned, x)  # four quarter turns: the identity
    # the same corner ends up in the same place, at either size
    latent, image = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 64, 64)
    latent[..., :4, :4], image[..., :32, :32] = 1, 1
    for turns in range(4):
        small, large = Transform((4, 4), turns).apply(latent), Transform((4, 4), turns).apply(image, 8)
        assert torch.equal(torch.nn.functional.avg_pool2d(large, 8) > 0.5, small > 0.5), turns


def test_draws_follow_the_settings_and_the_seed():
    eq = Equivariance(prob=0.5, scales=(0.25, 1.0), rotate=True)
    draws = [eq.draw(seed, (32, 32)) for seed in range(400)]
    used = [d for d in draws if d is not None]
    assert 150 < len(used) < 250
    assert {d.size[0] for d in used} == set(range(8, 32))  # EQ-VAE's s/32, s = 8..31, at 256 px
    assert all(d.size[0] == d.size[1] for d in used) and {d.quarter_turns for d in used} == {1, 2, 3}
    assert eq.draw(17, (32, 32)) == eq.draw(17, (32, 32))
    scale_only = Equivariance(prob=1.0, scales=(0.5, 0.5), rotate=False)
    assert {scale_only.draw(s, (16, 24)) for s in range(20)} == {Transform((8, 12), 0)}
    assert Equivariance(prob=0.0).draw(3, (32, 32)) is None


def test_the_term_changes_the_decoders_gradients_when_on_and_costs_nothing_when_off():
    torch.manual_seed(0)
    model = VAETrainingForward(build_vae("tiny"))
    decodes = []
    model.vae.decoder.register_forward_hook(lambda *_: decodes.append(1))
    x = torch.rand(2, 3, 64, 64) * 2 - 1

    def decoder_gradient(weight, transform):
        model.zero_grad(set_to_none=True)
        out = model(x, noise_seed=3, transform=transform)
        loss = AutoencoderLoss("l1", 0.0, 1e-6, equivariance_weight=weight)(x, out.reconstruction, out.kl, None,
                                                                            out.equivariant)[0]
        loss.backward()
        return model.vae.decoder.conv_out.weight.grad.clone(), model.vae.encoder.conv_in.weight.grad.clone()

    plain = decoder_gradient(0.0, None)
    assert len(decodes) == 1  # off: one decode, no extra work
    again = decoder_gradient(1.0, None)  # on, but not this step
    assert torch.equal(plain[0], again[0]) and len(decodes) == 2
    with_term = decoder_gradient(1.0, Transform((5, 5), 1))
    assert len(decodes) == 4
    assert not torch.allclose(with_term[0], plain[0]) and not torch.allclose(with_term[1], plain[1])
    out = model(x, noise_seed=3, transform=Transform((5, 5), 1))
    assert out.equivariant[0].shape == out.equivariant[1].shape == (2, 3, 40, 40)


@pytest.mark.slow
def test_resume_with_the_term_on_is_bit_identical(tmp_path, photos):
    settings = dict(max_steps=6, equivariance_weight=1.0, equivariance_prob=0.5, equivariance_scales="0.5,1.0")
    straight = train(config(tmp_path, photos, **settings))
    assert "equivariance_loss" in json.dumps(straight["first_logged"]) + json.dumps(straight["last_logged"])
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-3", resumed_dir / "checkpoint-3")
    train(config(tmp_path, photos, output_dir=str(resumed_dir), resume="latest", **settings))
    a = load_file(tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    off = train(config(tmp_path, photos, max_steps=6, output_dir=str(tmp_path / "off")))
    c = load_file(tmp_path / "off" / "vae" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the term trained something


def test_equivariance_settings_are_checked():
    assert load_config(overrides=["equivariance_scales=[0.5, 0.75]"]).equivariance_scales == (0.5, 0.75)
    assert load_config(overrides={"equivariance_scales": [0.25, 1]}).equivariance_scales == (0.25, 1.0)
    for bad, message in [("equivariance_scales=0.5", "expects 2 values"), ("equivariance_scales=0.8,0.5", "low <= high"),
                         ("equivariance_scales=0,1", "0 < low"), ("equivariance_prob=1.5", "equivariance_prob"),
                         ("equivariance_weight=-1", "negative")]:
        with pytest.raises(ValueError, match=message):
            load_config(overrides=[bad])
    eq = load_config(Path(__file__).parents[1] / "train/configs/eq-finetune.yaml", ["init_from=x", "data=y"])
    assert (eq.learning_rate, eq.kl_weight, eq.disc_weight, eq.disc_start) == (4.5e-6, 1e-6, 0.5, 0)
    assert (eq.equivariance_prob, eq.equivariance_scales, eq.equivariance_rotate) == (0.5, (0.25, 1.0), True)


def test_kl_f8_16ch_is_the_sd3_vae():
    ours, sd3 = build_vae("kl-f8-16ch"), AutoencoderKL.from_config(SD3_VAE_CONFIG)
    for key, value in SD3_VAE_CONFIG.items():
        if not key.startswith("_"):
            mine = ours.config[key]
            assert (list(mine) if isinstance(mine, tuple) else mine) == value, key
    assert count_parameters(ours) == count_parameters(sd3) == 83_819_683
    assert ours.quant_conv is None and ours.post_quant_conv is None
    assert ours.load_state_dict(sd3.state_dict()) is not None  # the same tensors, name for name


def test_tiny_16ch_goes_through_single_file_eval_and_the_latent_cache(tmp_path, photos):
    from sdvae.export import save_single_file
    from sdvae.sources import load_pretrained_vae

    vae = build_vae("tiny-16ch").eval()
    assert vae.config.latent_channels == 16 and vae.quant_conv is None and vae.config.shift_factor is not None
    save_single_file(vae, tmp_path / "tiny16.safetensors")
    back = load_pretrained_vae(str(tmp_path / "tiny16.safetensors"))
    assert back.config.latent_channels == 16 and back.config.shift_factor == vae.config.shift_factor
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(back(x, sample_posterior=False).sample, vae(x, sample_posterior=False).sample)
    assert main(["eval", "--vae", f"t16={tmp_path / 'tiny16.safetensors'}", "--data", str(photos), "--out",
                 str(tmp_path / "eval"), "--resolution", "64", "--no-lpips", "--no-fid"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert main(["cache-latents", "--vae", str(tmp_path / "tiny16.safetensors"), "--data", str(photos), "--out",
                 str(tmp_path / "cache"), "--resolution", "64", "--num-workers", "0"]) == 0
    assert next(iter(LatentShards(tmp_path / "cache")))["mean"].shape[0] == 16


def test_factors_written_at_the_end_equal_sdvae_stats(tmp_path, photos, capsys):
    metrics = train(config(tmp_path, photos, model="tiny-16ch", max_steps=4, measure_factors_images=4))
    exported = json.loads((tmp_path / "run" / "vae" / "config.json").read_text())
    factors = metrics["latent_factors"]
    assert factors["measured"] and factors["images"] == 4 and factors["previous"]["scaling_factor"] == 1.0
    assert exported["scaling_factor"] == factors["scaling_factor"] != 1.0
    assert exported["shift_factor"] == factors["shift_factor"] != 0.0
    capsys.readouterr()
    assert main(["stats", "--vae", str(tmp_path / "run" / "vae"), "--data", str(photos), "--resolution", "32",
                 "--max-images", "4"]) == 0
    stats = json.loads(capsys.readouterr().out.split("\nlatent std")[0])
    assert stats["scaling_factor"] == pytest.approx(exported["scaling_factor"], rel=1e-6)  # fp32 conv rounding
    assert stats["shift_factor"] == pytest.approx(exported["shift_factor"], rel=1e-6, abs=1e-9)
    # the KL of every latent channel and the latents' std are logged, so a collapsed channel shows
    assert {f"kl_channel/{c:02d}" for c in range(16)} <= set(metrics["last_logged"])
    assert metrics["last_logged"]["latent_std"] > 0


def test_four_channel_runs_get_no_shift_and_measuring_can_be_turned_off(tmp_path, photos):
    metrics = train(config(tmp_path, photos, max_steps=2))
    exported = json.loads((tmp_path / "run" / "vae" / "config.json").read_text())
    assert exported["scaling_factor"] == metrics["latent_factors"]["scaling_factor"] != 0.18215
    assert exported["shift_factor"] is None
    metrics = train(config(tmp_path, photos, max_steps=2, measure_factors=False, output_dir=str(tmp_path / "off")))
    assert not metrics["latent_factors"]["measured"]
    assert json.loads((tmp_path / "off" / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
    with pytest.raises(ValueError, match="frozen encoder"):
        load_config(overrides=["init_from=x", "train_decoder_only=true", "measure_factors=true"])
