"""sdvae fp16-check and fp16-fix on VAEs built to overflow fp16 while their fp32 output is their base's: the check
names the layers, the fix makes the fp16 decode finite and within four 8-bit levels of the original's fp32 decode on
held-out photos, keeps the encoder bit-identical and exports force_upcast false; a safe VAE is left bit-identical."""
import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from sdvae.cli import main
from sdvae.config import load_config
from sdvae.demo import holdout_squares
from sdvae.fp16 import FP16_MAX, LEVELS, overflowing_vae
from sdvae.models import build_vae

SIDE = 32  # check images: held-out squares of the embedded photos, never trained on


def held_out(count=8):
    squares = holdout_squares(SIDE)
    return torch.stack(squares[:: len(squares) // count][:count])


@torch.no_grad()
def fp16_against_fp32(fixed, original, images):
    """(fp16 decode of `fixed` all finite, its max difference in 8-bit levels to `original`'s fp32 decode)."""
    latents = original.encode(images).latent_dist.mode()
    reference = original.decode(latents).sample
    decoded = fixed.half().decode(latents.half()).sample.float()
    return bool(decoded.isfinite().all()), float((decoded - reference).abs().nan_to_num(float("inf")).max()) * LEVELS


def fix(tmp_path, vae, *extra):
    source = tmp_path / "source"
    vae.save_pretrained(source)
    out = tmp_path / "fixed"
    assert main(["fp16-fix", str(source), "--out", str(out), "--resolution", str(SIDE), *extra]) == 0
    return AutoencoderKL.from_pretrained(source).eval(), out


def assert_fixed(original, out, stages):
    report = json.loads((out / "fp16-report.json").read_text())
    assert not report["before"]["decode_finite"] and report["after"]["decode_finite"], report["stages"]
    assert report["stages"] == stages and report["encoder_identical"] and report["force_upcast"] is False
    fixed = AutoencoderKL.from_pretrained(out / "vae").eval()
    assert fixed.config.force_upcast is False
    assert all(torch.equal(original.state_dict()[k], v) for k, v in fixed.state_dict().items()
               if k.startswith(("encoder.", "quant_conv.")))
    finite, levels = fp16_against_fp32(fixed, original, held_out(16))
    assert finite and levels <= 4, levels
    assert not fp16_against_fp32(copy.deepcopy(original), original, held_out(16))[0]  # the source did overflow
    return report


@pytest.mark.parametrize("kind", ["before-norm", "residual", "attention"])
def test_rescaling_alone_fixes_overflow_that_groupnorms_make_scale_free(tmp_path, kind):
    original, out = fix(tmp_path, overflowing_vae(kind))
    report = assert_fixed(original, out, ["exact rescaling"])
    assert report["rescale"]["fp32_diff_levels"] < 0.01  # the output did not change
    assert not (out / "fine-tune").exists()


@pytest.mark.slow
def test_the_fine_tune_acts_where_rescaling_cannot_and_the_export_says_how_far_it_got(tmp_path, capsys):
    """A GroupNorm's affine output into a SiLU: no identity moves it. The fine-tune trains only the block that holds
    it, lowers its activations and leaves the encoder alone; force_upcast stays true until the fp16 decode is within
    the bound, and the export says so."""
    original, out = fix(tmp_path, overflowing_vae("norm-affine"), "--steps", "150")
    report = json.loads((out / "fp16-report.json").read_text())
    assert report["stages"] == ["exact rescaling", "fine-tune (150 steps)"] and report["encoder_identical"]
    assert "decoder.mid_block.resnets.0.norm2" in report["rescale"]["still_above_target"]
    run = json.loads((out / "fine-tune" / "metrics.json").read_text())
    assert run["last_logged"]["max_activation"] < 0.9 * run["first_logged"]["max_activation"]
    trained = AutoencoderKL.from_pretrained(out / "fine-tune" / "vae")
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, original.state_dict()[k])}
    assert changed and all(k.startswith("decoder.mid_block.resnets.0.") for k in changed)  # that block alone
    finite, levels = fp16_against_fp32(AutoencoderKL.from_pretrained(out / "vae").eval(), original, held_out(16))
    within = finite and levels <= 4
    assert report["force_upcast"] is (not within)
    assert AutoencoderKL.from_pretrained(out / "vae").config.force_upcast is (not within)
    assert ("not fp16-safe yet" in capsys.readouterr().out) is (not within)


def test_a_safe_vae_is_reported_safe_and_left_bit_identical(tmp_path, capsys):
    vae = build_vae("tiny")
    original, out = fix(tmp_path, vae)
    report = json.loads((out / "fp16-report.json").read_text())
    assert report["stages"] == ["none: already fp16-safe"] and report["force_upcast"] is False
    fixed = AutoencoderKL.from_pretrained(out / "vae")
    assert fixed.config.force_upcast is False
    assert all(torch.equal(original.state_dict()[k], v) for k, v in fixed.state_dict().items())
    single = load_file(out / "vae.safetensors") if (out / "vae.safetensors").exists() else None
    assert single is None  # the tiny preset is not the UIs' architecture: no single file claimed for it


def test_fp16_check_names_the_overflowing_layers_and_writes_json_and_plot(tmp_path, capsys):
    source = tmp_path / "source"
    overflowing_vae("before-norm").save_pretrained(source)
    assert main(["fp16-check", str(source), "--out", str(tmp_path / "check"), "--resolution", str(SIDE)]) == 0
    said = capsys.readouterr().out
    assert "OVERFLOWS fp16" in said and "NOT fp16-safe" in said and "fp16 decode: NOT finite" in said
    report = json.loads((tmp_path / "check" / "fp16-report.json").read_text())
    over = [row["name"] for row in report["layers"] if row["max_abs"] > FP16_MAX]
    assert over and all(name.endswith("conv1") for name in over) and not report["safe"]
    assert all(name in said for name in over[:3])
    assert Image.open(tmp_path / "check" / "activations.png").size[0] > 300
    assert main(["fp16-check", str(source), "--out", str(tmp_path / "check"), "--resolution", str(SIDE)]) == 0


def test_a_tiny_student_is_refused_in_one_line(tmp_path, capsys):
    from sdvae.models import build_student

    build_student("taesd-16", build_vae("tiny")).save_pretrained(tmp_path / "student")
    assert main(["fp16-fix", str(tmp_path / "student"), "--out", str(tmp_path / "out")]) == 2
    assert "tiny student" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (dict(output_reference="x"), "needs train_decoder_only"),
    (dict(output_reference="x", train_decoder_only=True, init_from="y", equivariance_weight=1.0), "equivariance_weight with"),
    (dict(output_reference="x", train_decoder_only=True, init_from="y", disc_weight=0.5), "disc_weight with"),
    (dict(activation_limit=0), "activation_limit"),
])
def test_output_reference_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)
