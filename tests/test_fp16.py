"""sdvae.fp16: the fp16 report, the exact rescaling and the overflowing VAEs it is checked on."""
import copy
import functools
import math
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image

from sdvae.images import load_photo
from sdvae.fp16 import (FP16_MAX, ActivationMaxima, _small_vae, fp16_report, overflowing_vae, rescale_exact,
                        norm_paths, rescale_through_silu)

PHOTO_NAMES = ("astronaut", "coffee", "chelsea")
SIZE = 32  # fp16 convolutions on a CPU are slow: small photos keep the file fast
BOUND_LEVELS = 4.0

# Outputs no power-of-two rescaling can move: normalised ones (GroupNorm, then SiLU), attention's q/k and the
# decoder's output itself.
UNSCALABLE = re.compile(r"(norm\d?|norm_out|group_norm|nonlinearity|conv_act|to_[qk]|conv_out)$")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    arrays = [np.asarray(Image.fromarray(load_photo(name)).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
              for name in PHOTO_NAMES]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@functools.lru_cache(maxsize=None)
def overflowing(kind: str) -> AutoencoderKL:
    return overflowing_vae(kind)  # shared by the tests below, none of which changes it


def small_vae(seed: int = 0, **config) -> AutoencoderKL:
    config = dict(dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1), **config)
    blocks = len(config["block_out_channels"])
    torch.manual_seed(seed)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=64, **config).eval()


def latents_of(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(images).latent_dist.mode()


def decode(vae: AutoencoderKL, latents: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    model = copy.deepcopy(vae).half() if dtype == torch.float16 else vae
    with torch.no_grad():
        return model.decode(latents.to(dtype)).sample.float()


def levels(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) * 127.5


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_safe_vae_is_reported_safe_and_left_bit_identical(photos):
    vae = small_vae()
    report = fp16_report(vae, photos)
    assert report["safe"] and report["decode_finite"] and report["encode_finite"]
    assert report["decode_max_diff_levels"] <= BOUND_LEVELS and report["encode_max_diff"] < 0.05
    assert report["images"] == len(PHOTO_NAMES) and report["size"] == [SIZE, SIZE]
    rescaled, info = rescale_exact(vae)
    assert info["changed"] is False and info["factors"] == {} and info["fp32_diff_levels"] == 0.0
    assert rescaled is not vae
    assert_same_tensors(vae.state_dict(), rescaled.state_dict())


def test_report_rows_follow_execution_order_with_the_stream_containers(photos):
    report = fp16_report(small_vae(), photos)
    names = [row["name"] for row in report["layers"]]
    parts = [row["part"] for row in report["layers"]]
    assert names[0] == "encoder.conv_in" and names[-1] == "decoder.conv_out"
    assert parts == sorted(parts, key=["encoder", "decoder"].index)  # the encoder ran first
    assert names.index("quant_conv") < names.index("post_quant_conv") < names.index("decoder.conv_in")
    assert names.index("decoder.mid_block.resnets.0") < names.index("decoder.mid_block.attentions.0")
    for container in ("decoder.mid_block", "decoder.up_blocks.0", "decoder.up_blocks.0.upsamplers.0",
                      "encoder.down_blocks.0.downsamplers.0", "decoder.up_blocks.1.resnets.0"):
        assert container in names
    assert not [name for name in names if name.endswith("to_out.1")]  # dropout repeats to_out.0
    for row in report["layers"]:
        assert row["headroom"] == pytest.approx(FP16_MAX / row["max_abs"])
    decoder_rows = [row for row in report["layers"] if row["part"] == "decoder"]
    top = max(decoder_rows, key=lambda row: row["max_abs"])
    assert report["largest"]["decoder"] == dict(name=top["name"], max_abs=top["max_abs"])


@pytest.mark.parametrize("kind", ["before-norm", "residual", "attention", "query-key", "attention-norm"])
def test_overflowing_vae_keeps_fp32_output_but_fails_in_fp16(kind, photos):
    base, vae = _small_vae(0), overflowing(kind)
    latents = latents_of(base, photos)
    assert levels(decode(vae, latents), decode(base, latents)) < 0.05
    assert_same_tensors(base.encoder.state_dict(), vae.encoder.state_dict())
    report = fp16_report(vae, photos)
    assert not report["decode_finite"] and not report["safe"] and report["encode_finite"]
    assert report["decode_max_diff_levels"] == math.inf
    over = [row["name"] for row in report["layers"] if row["max_abs"] > FP16_MAX]
    assert report["largest"]["decoder"]["name"] in over
    if kind == "before-norm":
        conv1s = {name for name, _ in vae.named_modules() if name.startswith("decoder.") and name.endswith(".conv1")}
        assert set(over) == conv1s and len(conv1s) == 6
    elif kind == "residual":
        assert "decoder.conv_in" in over and "decoder.up_blocks.1.resnets.1" in over
        assert not [name for name in over if UNSCALABLE.search(name) or name.endswith("conv1")]
    elif kind == "attention":
        assert over == ["decoder.mid_block.attentions.0.to_v"]
    elif kind == "query-key":
        assert over == ["decoder.mid_block.attentions.0.to_q"]
    else:
        assert over == ["decoder.mid_block.attentions.0.group_norm"]


@pytest.mark.parametrize("kind", ["before-norm", "residual", "attention", "query-key", "attention-norm"])
def test_rescale_makes_the_fp16_decode_match_the_original(kind, photos):
    original = overflowing(kind)
    weights_before = copy.deepcopy(original.state_dict())
    rescaled, info = rescale_exact(original)
    assert info["changed"] and info["still_above_target"] == []
    assert info["largest_before"]["max_abs"] > FP16_MAX >= 8 * info["largest_after"]["max_abs"]
    assert info["fp32_diff_levels"] < 0.01
    assert all(math.log2(factor).is_integer() for factor in info["factors"].values())
    assert_same_tensors(weights_before, original.state_dict())  # the caller's VAE is left alone
    assert_same_tensors(original.encoder.state_dict(), rescaled.encoder.state_dict())
    assert_same_tensors(original.quant_conv.state_dict(), rescaled.quant_conv.state_dict())
    latents = latents_of(original, photos)
    reference = decode(original, latents)
    assert levels(decode(rescaled, latents), reference) < 0.01
    half = decode(rescaled, latents, torch.float16)
    assert half.isfinite().all()
    assert levels(half, reference) <= BOUND_LEVELS


def test_rescale_leaves_a_norms_affine_output_into_a_silu_to_the_fine_tune(photos):
    original = overflowing("norm-affine")
    assert not decode(original, latents_of(original, photos), torch.float16).isfinite().all()
    rescaled, info = rescale_exact(original)
    assert "decoder.mid_block.resnets.0.norm2" in info["still_above_target"]
    assert not decode(rescaled, latents_of(original, photos), torch.float16).isfinite().all()


@pytest.mark.parametrize("seed", [0, 1])
def test_rescaling_through_the_silu_fixes_a_norms_affine_output_at_a_measured_cost(seed, photos):
    original = overflowing_vae("norm-affine", seed=seed)
    exact, _ = rescale_exact(original)
    weights_before = copy.deepcopy(exact.state_dict())
    rescaled, info = rescale_through_silu(exact, images=photos)
    assert_same_tensors(weights_before, exact.state_dict())  # the caller's VAE is left alone
    assert list(info["scaled"]) == ["decoder.mid_block.resnets.0.norm2"] and info["still_above_target"] == []
    assert info["scaled"]["decoder.mid_block.resnets.0.norm2"]["readers"] == ["decoder.mid_block.resnets.0.conv2"]
    assert info["largest_before"]["max_abs"] > FP16_MAX >= 8 * info["largest_after"]["max_abs"]
    assert_same_tensors(original.encoder.state_dict(), rescaled.encoder.state_dict())
    changed = {k for k, v in rescaled.state_dict().items() if not torch.equal(v, exact.state_dict()[k])}
    block = "decoder.mid_block.resnets.0"
    assert {f"{block}.norm2.weight", f"{block}.conv2.weight"} <= changed <= {
        f"{block}.norm2.weight", f"{block}.norm2.bias", f"{block}.conv2.weight"}  # the bias: zero at init
    ratio = rescaled.decoder.mid_block.resnets[0].norm2.weight / exact.decoder.mid_block.resnets[0].norm2.weight
    assert torch.equal(torch.exp2(torch.log2(ratio).round()), ratio)  # powers of two, one per channel
    latents = latents_of(original, photos)
    reference = decode(original, latents)
    assert info["fp32_diff_levels"] == pytest.approx(levels(decode(rescaled, latents), reference), rel=1e-3)
    assert info["fp32_diff_levels"] < 0.05  # the SiLU works far from zero there: nearly a ReLU, which scales
    half = decode(rescaled, latents, torch.float16)
    assert half.isfinite().all() and levels(half, reference) <= BOUND_LEVELS
    # Aimed low, where the SiLU bends, the cost is real, and measured rather than assumed
    _, low = rescale_through_silu(exact, target=8.0, images=photos)
    assert low["fp32_diff_levels"] > BOUND_LEVELS


def test_rescaling_through_the_silu_leaves_a_vae_under_the_target_alone(photos):
    vae = small_vae()
    paths = norm_paths(vae)
    through_silu = [path for path in paths if path.through_silu]
    assert len(through_silu) == 2 * 6 + 1 and paths[-1].readers == ("decoder.conv_out",)  # 2 mid, 4 up resnets
    assert [path.norm for path in paths if not path.through_silu] == ["decoder.mid_block.attentions.0.group_norm"]
    rescaled, info = rescale_through_silu(vae, images=photos)
    assert info["changed"] is False and info["fp32_diff_levels"] == 0.0
    assert_same_tensors(vae.state_dict(), rescaled.state_dict())


@pytest.mark.parametrize("config", [
    dict(block_out_channels=(32,), mid_block_add_attention=False),
    dict(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=16, use_post_quant_conv=False),
    dict(block_out_channels=(8, 16, 16, 32), layers_per_block=3, norm_num_groups=4),
])
def test_rescale_to_a_low_target_preserves_the_output(config, photos):
    # A target far below the activations forces a scale on every stage and every conv1 of a healthy VAE.
    vae, target = small_vae(seed=1, **config), 0.25
    rescaled, info = rescale_exact(vae, target=target, images=photos)
    assert info["changed"]
    boundary = re.compile(r"conv_shortcut$|upsamplers\.\d+$")
    boundaries = [name for name, _ in vae.decoder.named_modules() if boundary.search(name)]
    assert len(info["stages"]) == 1 + len(boundaries)  # conv_in, then a new scale at each of these
    assert all(stage["scale"] < 1 for stage in info["stages"])
    assert [name for name in info["still_above_target"] if not UNSCALABLE.search(name)] == []
    assert ("post_quant_conv.weight" in info["factors"]) == (vae.post_quant_conv is not None)
    assert_same_tensors(vae.encoder.state_dict(), rescaled.encoder.state_dict())
    # Exact but for GroupNorm's eps, which weighs more as activations shrink: without it, not a bit may change.
    without_eps = [copy.deepcopy(vae), copy.deepcopy(rescaled)]
    for module in [m for model in without_eps for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]:
        module.eps = 0.0
    latents = torch.randn(2, vae.config.latent_channels, 4, 4) * 4  # not the latents the scales were chosen on
    assert levels(decode(without_eps[1], latents), decode(without_eps[0], latents)) < 1e-4


def test_tiny_vae_is_refused():
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    with pytest.raises(ValueError, match="tiny VAEs have no GroupNorm"):
        rescale_exact(tiny)


def test_penalty_is_differentiable_and_zero_under_the_limit():
    vae = small_vae()
    latents = torch.randn(1, 4, 8, 8) * 5
    with ActivationMaxima(vae, parts=("decoder",), keep_tensors=True) as recorder:
        vae.decode(latents)
        kept_once = {name: len(outputs) for name, outputs in recorder.kept.items()}
        vae.decode(latents)  # replaces the first forward's tensors, does not add to them
    assert {name: len(outputs) for name, outputs in recorder.kept.items()} == kept_once
    peak = max(recorder.maxima.values())
    assert recorder.penalty(2 * peak).item() == 0.0
    loss = recorder.penalty(peak / 2)
    assert loss.item() > 0
    loss.backward()
    assert vae.decoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.decoder.up_blocks[-1].resnets[-1].conv2.weight.grad.abs().sum() > 0
    assert all(param.grad is None for param in vae.encoder.parameters())


def test_maxima_count_nan_as_inf_and_stop_at_exit():
    vae = small_vae()
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), ActivationMaxima(vae) as recorder:
        vae.decode(latents)
        finite = recorder.maxima
        latents[0, 0, 0, 0] = math.nan
        vae.decode(latents)
    assert math.isfinite(finite["decoder.conv_in"]) and recorder.maxima["decoder.conv_in"] == math.inf
    seen = recorder.maxima
    with torch.no_grad():
        vae.decode(latents * 1000)  # the hooks are gone: nothing changes
    assert recorder.maxima == seen
