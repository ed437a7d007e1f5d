import pytest
import torch

from sdvae.layouts import diffusers_to_ldm, ldm_to_diffusers, modernise_diffusers_keys
from sdvae.sources import config_from_state
from sdvae.models import build_vae
from sdvae.presets import preset_config


@pytest.mark.parametrize("preset", ["tiny", "sd-kl-f8"])
def test_ldm_layout_both_ways_matches_diffusers_own_converter(preset):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = build_vae(preset).state_dict()
    ldm = diffusers_to_ldm(state)
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.up.0.block.0.nin_shortcut.weight" in ldm
    theirs = convert_ldm_vae_checkpoint(dict(ldm), preset_config(preset))
    ours = ldm_to_diffusers(ldm)
    assert ours.keys() == theirs.keys() == state.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], state[k]) for k in state)
    config = config_from_state(ldm)
    assert list(config["block_out_channels"]) == list(preset_config(preset)["block_out_channels"])
    assert config["layers_per_block"] == preset_config(preset)["layers_per_block"]


def test_old_diffusers_attention_names_are_renamed():
    state = build_vae("tiny").state_dict()
    old = {k.replace("attentions.0.to_q.", "attentions.0.query.").replace("attentions.0.to_out.0.", "attentions.0.proj_attn."): v
           for k, v in state.items()}
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    assert modernise_diffusers_keys(old).keys() == state.keys()


@pytest.mark.slow
def test_convert_both_ways_is_bit_identical_and_loads_in_diffusers(tmp_path):
    from diffusers import AutoencoderKL

    from sdvae.cli import main

    torch.manual_seed(0)
    vae = build_vae("sd-kl-f8").eval()
    vae.save_pretrained(tmp_path / "diffusers")
    assert main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "vae.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "vae.safetensors"), str(tmp_path / "back")]) == 0
    back = AutoencoderKL.from_pretrained(tmp_path / "back")
    a, b = vae.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # diffusers' own single-file loader reads what we wrote, and gives the same model
    theirs = AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(tmp_path / "diffusers")).eval()
    c = theirs.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae(x).sample, theirs(x).sample)


def test_export_single_file_has_metadata_and_fp16(tmp_path):
    from safetensors import safe_open

    from sdvae.cli import main

    build_vae("tiny").save_pretrained(tmp_path / "run" / "vae")
    assert main(["export", str(tmp_path / "run"), "--format", "single-file", "--out", str(tmp_path / "v.safetensors"),
                 "--dtype", "fp16"]) == 0
    with safe_open(str(tmp_path / "v.safetensors"), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("decoder.up.0.block.0.conv1.weight").dtype == torch.float16
    assert meta["sdvae.scaling_factor"] == "0.18215" and "block_out_channels" in meta["sdvae.architecture"]


def test_bad_keys_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from sdvae.sources import load_single_file

    state = {k: v.contiguous() for k, v in diffusers_to_ldm(build_vae("tiny").state_dict()).items()}
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['decoder.conv_out.bias'\].*unexpected \['decoder.extra.weight'\]"):
        load_single_file(tmp_path / "bad.safetensors")


def test_single_files_keep_the_factors_shapes_cannot_tell(tmp_path):
    from safetensors.torch import save_file

    from sdvae.sources import load_single_file
    from sdvae.export import save_single_file

    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=0.4321, shift_factor=0.05)
    save_single_file(vae, tmp_path / "ours.safetensors")
    back = load_single_file(tmp_path / "ours.safetensors")
    assert back.config.scaling_factor == 0.4321 and back.config.shift_factor == 0.05
    assert vae.config.norm_num_groups == 8 and back.config.norm_num_groups == 8  # SD's 32 would load, wrongly
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x).sample, vae(x).sample, rtol=0, atol=0)

    ldm = {f"first_stage_model.{k}": v.contiguous() for k, v in diffusers_to_ldm(build_vae("tiny").state_dict()).items()}
    ldm["conditioner.embedders.1.model.text_projection"] = torch.zeros(2, 2)  # an SDXL checkpoint
    save_file(ldm, str(tmp_path / "sdxl.safetensors"))
    assert load_single_file(tmp_path / "sdxl.safetensors").config.scaling_factor == 0.13025


def test_what_the_shapes_tell_is_read_from_a_bare_file(tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from sdvae.sources import load_single_file

    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=8, layers_per_block=1,
                        mid_block_add_attention=False, use_quant_conv=False)
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}, str(tmp_path / "bare.safetensors"))
    with pytest.warns(UserWarning, match="8 latent channels and no scaling factor"):  # SD's would be a guess
        back = load_single_file(tmp_path / "bare.safetensors")  # no metadata: all from the shapes
    assert not back.config.mid_block_add_attention and not back.config.use_quant_conv
    assert back.config.use_post_quant_conv and back.config.latent_channels == 8
    assert back.config.sample_size == 512  # SD's (diffusers' default of 32 would make enable_tiling() tile at 32 px)


def sixteen_channel_vae():
    """SD3 / FLUX VAE architecture (16 latent channels, no quant convs), small."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=16, layers_per_block=1,
                         use_quant_conv=False, use_post_quant_conv=False)


@pytest.mark.parametrize("marker, prefix, vae, factors", [
    ("conditioner.embedders.1.model.text_projection", "first_stage_model.", "tiny", (0.13025, None)),  # SDXL base
    ("conditioner.embedders.0.model.text_projection", "first_stage_model.", "tiny", (0.13025, None)),  # SDXL refiner
    ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "first_stage_model.", "16",
     (1.5305, 0.0609)),  # SD3 / SD3.5
    ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "vae.", "16", (0.3611, 0.1159)),  # FLUX.1
])
def test_whole_checkpoints_give_their_family_s_factors(tmp_path, marker, prefix, vae, factors):
    from safetensors.torch import save_file

    from sdvae.sources import load_single_file

    vae = build_vae("tiny") if vae == "tiny" else sixteen_channel_vae()
    whole = {prefix + k: v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    whole[marker] = torch.zeros(4)
    save_file(whole, str(tmp_path / "whole.safetensors"))
    back = load_single_file(tmp_path / "whole.safetensors")
    assert (back.config.scaling_factor, back.config.shift_factor) == factors
    assert back.config.sample_size == 1024  # diffusers' enable_tiling() tiles at this size
    a, b = vae.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_playground_checkpoints_keep_their_latent_mean_and_std(tmp_path):
    """Playground v2.5 is SDXL-shaped but normalises latents per channel: (z - mean) * 0.5 / std (diffusers' reading)."""
    from safetensors.torch import save_file

    from sdvae.sources import load_single_file

    ldm = diffusers_to_ldm(build_vae("tiny").state_dict())
    whole = {"first_stage_model." + k: v.contiguous() for k, v in ldm.items()}
    whole["conditioner.embedders.1.model.text_projection"] = torch.zeros(2, 2)
    whole["edm_mean"] = torch.tensor([0.5, -0.5, 0.25, 0.0]).view(1, 4, 1, 1)
    whole["edm_std"] = torch.full((1, 4, 1, 1), 0.75)
    save_file(whole, str(tmp_path / "playground.safetensors"))
    config = load_single_file(tmp_path / "playground.safetensors").config
    assert config.scaling_factor == 0.5
    assert config.latents_mean == [0.5, -0.5, 0.25, 0.0] and config.latents_std == [0.75] * 4


def test_single_file_export_records_the_measured_force_upcast(tmp_path):
    from sdvae.sources import load_single_file
    from sdvae.export import save_single_file

    vae = build_vae("tiny")
    assert vae.config.force_upcast  # diffusers' default
    save_single_file(vae, tmp_path / "v.safetensors", fp16=dict(force_upcast=False, max_abs_diff=0.001))
    assert load_single_file(tmp_path / "v.safetensors").config.force_upcast is False


def test_a_diffusers_weights_file_reads_the_config_beside_it(tmp_path):
    """The tiny preset's 8 norm groups are in config.json only; the shapes would load as SD's 32, wrongly."""
    from sdvae.cli import main
    from sdvae.sources import load_single_file

    torch.manual_seed(0)
    vae = build_vae("tiny").eval()
    vae.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    back = load_single_file(weights)
    assert back.config.norm_num_groups == 8
    assert main(["convert", str(weights), str(tmp_path / "v.safetensors")]) == 0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_single_file(tmp_path / "v.safetensors").eval()(x).sample, vae(x).sample,
                                   rtol=0, atol=0)


def test_a_garbage_checkpoint_is_a_clear_error(tmp_path):
    from sdvae.weights import read_state_dict

    (tmp_path / "garbage.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="garbage.ckpt is not a readable torch checkpoint"):
        read_state_dict(tmp_path / "garbage.ckpt")
