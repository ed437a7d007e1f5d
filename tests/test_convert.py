import pytest
import torch

from sdvae.convert import config_from_state, diffusers_to_ldm, ldm_to_diffusers, modernise_diffusers_keys
from sdvae.models import build_vae, preset_config


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

    from sdvae.convert import load_single_file

    state = {k: v.contiguous() for k, v in diffusers_to_ldm(build_vae("tiny").state_dict()).items()}
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['decoder.conv_out.bias'\].*unexpected \['decoder.extra.weight'\]"):
        load_single_file(tmp_path / "bad.safetensors")


def test_single_files_keep_the_factors_shapes_cannot_tell(tmp_path):
    from safetensors.torch import save_file

    from sdvae.convert import load_single_file
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

    from sdvae.convert import load_single_file

    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=8, layers_per_block=1,
                        mid_block_add_attention=False, use_quant_conv=False)
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}, str(tmp_path / "bare.safetensors"))
    back = load_single_file(tmp_path / "bare.safetensors")  # no metadata: all from the shapes
    assert not back.config.mid_block_add_attention and not back.config.use_quant_conv
    assert back.config.use_post_quant_conv and back.config.latent_channels == 8
