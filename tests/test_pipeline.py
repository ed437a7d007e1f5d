"""An exported VAE inside a diffusers StableDiffusionPipeline built offline from tiny random parts."""
import pytest
import json

import numpy as np
import torch

from sdvae.cli import main
from sdvae.models import build_vae

pytestmark = pytest.mark.slow  # every test here trains, probes or starts processes


def tiny_pipeline(vae):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_exported_vae_runs_in_a_stable_diffusion_pipeline_with_our_scaling_factor(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=0.5)  # as `sdvae stats --write` would set it
    vae.save_pretrained(tmp_path / "run" / "vae")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "pipe" / "vae")]) == 0
    config = json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == 0.5 and isinstance(config["force_upcast"], bool)

    loaded = AutoencoderKL.from_pretrained(tmp_path / "pipe", subfolder="vae")
    pipe = tiny_pipeline(loaded)
    embeds = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))
    run = dict(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=1.0, height=64, width=64)
    latents = pipe(**run, output_type="latent", generator=torch.Generator().manual_seed(2)).images
    images = pipe(**run, output_type="np", generator=torch.Generator().manual_seed(2)).images
    assert latents.shape == (1, 4, 8, 8) and images.shape == (1, 64, 64, 3)
    with torch.no_grad():  # the pipeline divides by OUR scaling factor before decoding
        ours = loaded.decode(latents / 0.5).sample
    expected = ((ours / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_fp16_check_sets_force_upcast_from_measurement():
    from sdvae.export import fp16_check

    torch.manual_seed(0)
    vae = build_vae("tiny")
    check = fp16_check(vae)
    assert check["max_abs_diff"] >= 0 and check["force_upcast"] == (check["nonfinite"] or check["max_abs_diff"] > check["bound"])
    with torch.no_grad():  # a decoder that overflows fp16 (as the SD VAE does at high resolution)
        vae.decoder.conv_out.weight.mul_(1e7)
    broken = fp16_check(vae)
    assert broken["nonfinite"] and broken["force_upcast"]
