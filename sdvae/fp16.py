"""fp16 safety of AutoencoderKL: which activations overflow half precision, and the exact rescaling that removes
what the algebra allows (`sdvae fp16-check`, `sdvae fp16-fix`: sdvae.fp16_fix).

The SDXL VAE decodes to NaN in fp16 because some activations exceed fp16's largest finite value. Most of them sit in
places whose scale the network does not care about: a layer read only through a GroupNorm, or the decoder's residual
stream, which conv_norm_out normalises before conv_out. `rescale_exact` moves those by powers of two, which changes
no output in exact arithmetic and adds no rounding to the weights; so do an attention's value path, which is linear,
and its queries against its keys, which meet only in dot products.
A GroupNorm's affine output read by a SiLU has no identity: `rescale_through_silu` moves it per channel at a measured
fp32 cost (silu(x c) / c is nearly silu(x) where |x| is large, which is where overflow happens). What is left goes to
a fine-tune, which penalises activations through `ActivationMaxima(keep_tensors=True)`.
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .weights import TINY, latent_mode, model_kind

FP16_MAX = 65504.0

# The modules that make up each part, in the order AutoencoderKL runs them.
PARTS = {"encoder": ("encoder", "quant_conv"), "decoder": ("post_quant_conv", "decoder")}

# Containers whose output is the residual stream: recording them shows the stream's size at each depth, which the
# leaves alone do not (a resnet's output is a sum no leaf returns).
STREAM_CONTAINERS = (ResnetBlock2D, Attention, Upsample2D, Downsample2D, UNetMidBlock2D, UpDecoderBlock2D,
                     DownEncoderBlock2D)

# Leaves that return their input (dropout in eval): a row for them would repeat the row before.
PASS_THROUGH = (nn.Dropout, nn.Identity)

LEVELS = 127.5  # 8-bit levels per unit of a [-1, 1] image

# Random latents for the measurements: a few, and small enough to decode an SDXL-sized VAE on a CPU in seconds.
PROBE_LATENTS = (2, 16, 16)

# How far past FP16_MAX the overflowing test VAEs go. Layers that read a GroupNorm's output overflow on any input by
# the same margin; the residual stream follows the latents' size, and the random probe's are larger than a photo's.
NORMALISED_MARGIN, STREAM_MARGIN = 2.0, 16.0


def _peak(tensor: torch.Tensor) -> torch.Tensor:
    """max |tensor| as a 0-d float tensor on the tensor's device; NaN counts as inf (both break an fp16 decode)."""
    peak = tensor.detach().abs().amax().float()
    return torch.nan_to_num(peak, nan=math.inf, posinf=math.inf)


def _recorded(module: nn.Module) -> bool:
    if isinstance(module, STREAM_CONTAINERS):
        return True
    return next(module.children(), None) is None and not isinstance(module, PASS_THROUGH)


def _output_tensors(output) -> list[torch.Tensor]:
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return [t for t in outputs if torch.is_tensor(t) and t.is_floating_point() and t.numel() > 0]


class ActivationMaxima:
    """Largest |output| of each module of a VAE's parts, over every forward run inside the `with` block.

    `maxima` is ordered by the first time each module ran, so rows read as depth. Maxima stay on the device until
    read: a hook that called float() would make every layer of a training step wait for the GPU.
    With keep_tensors=True the live outputs of each part's last forward are kept, for `penalty`.
    """

    def __init__(self, vae: nn.Module, parts=("decoder",), keep_tensors: bool = False):
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown VAE part(s) {sorted(unknown)}: choose from {sorted(PARTS)}")
        self.vae, self.parts, self.keep_tensors = vae, tuple(parts), keep_tensors
        self.part_of: dict[str, str] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}
        self._peaks: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> ActivationMaxima:
        modules = dict(self.vae.named_modules())
        for part in self.parts:
            for root in PARTS[part]:
                if modules.get(root) is None:  # use_quant_conv / use_post_quant_conv=False, or a tiny VAE
                    continue
                self._handles.append(modules[root].register_forward_pre_hook(self._forget(root)))
                for name, module in modules[root].named_modules(prefix=root):
                    if _recorded(module):
                        self._handles.append(module.register_forward_hook(self._record(name, part)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forget(self, root: str):
        # A new forward of a part replaces its kept tensors: the penalty is on the last forward, not on all of them.
        def hook(module, args):
            for name in [n for n in self.kept if n == root or n.startswith(root + ".")]:
                del self.kept[name]
        return hook

    def _record(self, name: str, part: str):
        def hook(module, args, output):
            tensors = _output_tensors(output)
            if not tensors:
                return
            peak = torch.stack([_peak(t) for t in tensors]).amax()
            self.part_of.setdefault(name, part)
            self._peaks[name] = torch.maximum(self._peaks[name], peak) if name in self._peaks else peak
            if self.keep_tensors:
                self.kept.setdefault(name, []).extend(tensors)
        return hook

    @property
    def maxima(self) -> dict[str, float]:
        return {name: float(self._peaks[name]) for name in self.part_of}

    def rows(self) -> list[dict]:
        """One row per module in execution order: name, part, max_abs and headroom (FP16_MAX / max_abs)."""
        return [dict(name=name, part=self.part_of[name], max_abs=peak, headroom=_headroom(peak))
                for name, peak in self.maxima.items()]

    def penalty(self, limit: float) -> torch.Tensor:
        """sum over kept outputs of mean(relu(|a| - limit)^2) / limit^2: zero when all fit, differentiable."""
        if not self.keep_tensors:
            raise ValueError("penalty needs ActivationMaxima(..., keep_tensors=True)")
        # float(): the excess squared of an fp16 activation near FP16_MAX would itself overflow
        terms = [torch.relu(t.float().abs() - limit).square().mean() for ts in self.kept.values() for t in ts]
        if not terms:
            raise RuntimeError("no forward ran inside this ActivationMaxima: nothing to penalise")
        return torch.stack(terms).sum() / limit ** 2


def _headroom(peak: float) -> float:
    return FP16_MAX / peak if peak > 0 else math.inf


def _device(vae: nn.Module) -> torch.device:
    return next(vae.parameters()).device


def _copy_as(vae: nn.Module, dtype: torch.dtype) -> nn.Module:
    # half()/float() rather than to(dtype): diffusers' to() warns about fp32-kept modules even when there are none
    model = copy.deepcopy(vae)
    return (model.half() if dtype == torch.float16 else model.float()).eval()


def _encode(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Latents of images, the distribution's mode for a KL VAE (a deterministic encode, as a cache would store)."""
    return latent_mode(vae, images)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.float() - b.float()).abs()
    return float(torch.nan_to_num(diff, nan=math.inf, posinf=math.inf).amax())


def _largest(rows: list[dict], part: str) -> dict | None:
    rows = [row for row in rows if row["part"] == part]
    if not rows:
        return None
    top = max(rows, key=lambda row: row["max_abs"])
    return dict(name=top["name"], max_abs=top["max_abs"])


def fp16_report(vae: nn.Module, images: torch.Tensor, bound_levels: float = 4.0) -> dict:
    """Each layer's max |activation| (fp32) and whether the VAE encodes and decodes `images` ([-1, 1]) in fp16."""
    x = images.to(_device(vae), torch.float32)
    reference = _copy_as(vae, torch.float32)
    with torch.no_grad(), ActivationMaxima(reference, parts=("encoder", "decoder")) as recorder:
        latents = _encode(reference, x)
        decoded = reference.decode(latents).sample
    del reference
    half = _copy_as(vae, torch.float16)
    with torch.no_grad():
        latents16 = _encode(half, x.half())
        decoded16 = half.decode(latents.half()).sample  # the fp32 latents: the decoder judged alone
    rows = recorder.rows()
    decode_finite, encode_finite = bool(decoded16.isfinite().all()), bool(latents16.isfinite().all())
    decode_diff = _max_abs_diff(decoded16, decoded) * LEVELS
    return dict(
        layers=rows,
        decode_finite=decode_finite,
        encode_finite=encode_finite,
        decode_max_diff_levels=decode_diff,
        encode_max_diff=_max_abs_diff(latents16, latents),
        largest={part: _largest(rows, part) for part in ("encoder", "decoder")},
        safe=decode_finite and encode_finite and decode_diff <= bound_levels,
        images=int(x.shape[0]),
        size=[int(x.shape[-2]), int(x.shape[-1])],
    )


# --- exact rescaling -------------------------------------------------------------------------------------------------


def _check_rescalable(vae: nn.Module) -> None:
    if model_kind(vae) == TINY:
        raise ValueError("AutoencoderTiny cannot be rescaled: tiny VAEs have no GroupNorm: nothing to rescale exactly")
    decoder = getattr(vae, "decoder", None)
    if decoder is None or not isinstance(getattr(decoder, "conv_norm_out", None), nn.GroupNorm):
        raise ValueError(f"{type(vae).__name__}: the exact rescaling needs a decoder that ends in a GroupNorm "
                         "(diffusers AutoencoderKL's Decoder)")


def _invariant_input(norm: nn.Module | None, where: str) -> None:
    # Every identity below rests on a scale-invariant norm in front of the rest of the network.
    if not isinstance(norm, nn.GroupNorm):
        raise ValueError(f"{where}: expected a GroupNorm, found {type(norm).__name__}: no exact rescaling")


class Writer(NamedTuple):
    """A write into the decoder's residual stream. `normalised`: (name, layer) that read a GroupNorm's output;
    `linear`: those that read the stream itself through a linear map; `free`: the write may give the stream a new
    scale (true when nothing adds the old stream unchanged, i.e. no identity residual)."""
    name: str
    normalised: list
    linear: list
    free: bool


def _resnet_writer(name: str, resnet: nn.Module) -> Writer:
    if not isinstance(resnet, ResnetBlock2D) or resnet.time_emb_proj is not None:
        raise ValueError(f"{name}: only a ResnetBlock2D without a time embedding can be rescaled exactly")
    _invariant_input(resnet.norm1, f"{name}.norm1")
    _invariant_input(resnet.norm2, f"{name}.norm2")
    shortcut = resnet.conv_shortcut  # a 1x1 conv where the channels change, else the identity
    linear = [(f"{name}.conv_shortcut", shortcut)] if shortcut is not None else []
    return Writer(name, [(f"{name}.conv2", resnet.conv2)], linear, shortcut is not None)


def _attention_writer(name: str, attention: nn.Module) -> Writer:
    if not isinstance(attention, Attention) or attention.spatial_norm is not None:
        raise ValueError(f"{name}: only an Attention with a GroupNorm in front can be rescaled exactly")
    _invariant_input(attention.group_norm, f"{name}.group_norm")
    # q, k and v all read the normalised stream; only to_out writes back (plus the residual, at the stream's scale)
    return Writer(name, [(f"{name}.to_out.0", attention.to_out[0])], [], not attention.residual_connection)


def _upsampler_writer(name: str, upsampler: nn.Module) -> Writer:
    if not isinstance(upsampler, Upsample2D) or upsampler.norm is not None:
        raise ValueError(f"{name}: only an Upsample2D without a norm can be rescaled exactly")
    if not (upsampler.use_conv or upsampler.use_conv_transpose):
        return Writer(name, [], [], False)  # nearest-neighbour copies keep the stream's scale
    conv_name = "conv" if upsampler.use_conv_transpose or upsampler.name == "conv" else "Conv2d_0"
    return Writer(name, [], [(f"{name}.{conv_name}", getattr(upsampler, conv_name))], True)


def _mid_block_writers(mid: nn.Module) -> list[Writer]:
    if not isinstance(mid, UNetMidBlock2D):
        raise ValueError(f"decoder.mid_block: a {type(mid).__name__} is not supported")
    writers = [_resnet_writer("decoder.mid_block.resnets.0", mid.resnets[0])]
    for i, (attention, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attention is not None:  # mid_block_add_attention=False leaves None in its place
            writers.append(_attention_writer(f"decoder.mid_block.attentions.{i}", attention))
        writers.append(_resnet_writer(f"decoder.mid_block.resnets.{i + 1}", resnet))
    return writers


def _stream_writers(decoder: nn.Module) -> list[Writer]:
    """The decoder's writes into its residual stream, in forward order (diffusers' Decoder.forward)."""
    writers = [Writer("decoder.conv_in", [], [("decoder.conv_in", decoder.conv_in)], True)]
    writers += _mid_block_writers(decoder.mid_block)
    for b, block in enumerate(decoder.up_blocks):
        if not isinstance(block, UpDecoderBlock2D):
            raise ValueError(f"decoder.up_blocks.{b}: a {type(block).__name__} is not supported")
        prefix = f"decoder.up_blocks.{b}"
        writers += [_resnet_writer(f"{prefix}.resnets.{r}", resnet) for r, resnet in enumerate(block.resnets)]
        writers += [_upsampler_writer(f"{prefix}.upsamplers.{u}", up) for u, up in enumerate(block.upsamplers or [])]
    return writers


def _written_names(writer: Writer) -> list[str]:
    """Recorded outputs that carry the stream's scale after this write: the writer's output and its writing layers."""
    return [writer.name] + [name for name, _ in writer.normalised + writer.linear]


def _stages(writers: list[Writer], maxima: dict[str, float]) -> list[dict]:
    """Group the writers into stages (a new one at each free write) with the stage's largest fp32 activation."""
    stages = []
    for writer in writers:
        if writer.free:
            stages.append(dict(first=writer.name, last=None, max_abs=0.0))
        peaks = [maxima[name] for name in _written_names(writer) if name in maxima]
        stages[-1].update(last=writer.name, max_abs=max([stages[-1]["max_abs"]] + peaks))
    return stages


def _power_of_two_down(peak: float, target: float) -> float:
    """The largest 2^-k (k >= 0) that brings peak to target or below: powers of two add no rounding to weights."""
    if not math.isfinite(peak):
        raise ValueError("an activation is not finite even in fp32: no rescaling can fix that")
    return 2.0 ** -max(0, math.ceil(math.log2(peak / target))) if peak > 0 else 1.0


def _scale_layer(layer: nn.Module, prefix: str, weight: float, bias: float, factors: dict) -> None:
    with torch.no_grad():
        for param_name, factor in (("weight", weight), ("bias", bias)):
            param = getattr(layer, param_name, None)
            if param is not None and factor != 1.0:
                param.mul_(factor)
                key = f"{prefix}.{param_name}"
                factors[key] = factors.get(key, 1.0) * factor


def _scale_stream(vae: nn.Module, stage_scales: list[float], latent_scale: float, factors: dict) -> None:
    """Multiply the decoder's residual stream by stage_scales[i] in stage i, and post_quant_conv's output by
    latent_scale, in place. Exact because GroupNorms (norm1, attention's group_norm, conv_norm_out) are the stream's
    only readers besides the linear maps compensated here; their eps is left as it is (save_pretrained would not keep
    a changed eps, and the variance it is added to is far larger)."""
    if vae.post_quant_conv is not None:
        _scale_layer(vae.post_quant_conv, "post_quant_conv", latent_scale, latent_scale, factors)
    stage, previous = -1, latent_scale if vae.post_quant_conv is not None else 1.0
    for writer in _stream_writers(vae.decoder):
        stage += 1 if writer.free else 0
        scale = stage_scales[stage]
        for name, layer in writer.normalised:  # its input has no scale: the output takes the stream's new one
            _scale_layer(layer, name, scale, scale, factors)
        for name, layer in writer.linear:  # its input is the stream: the weight undoes the old scale, the bias not
            _scale_layer(layer, name, scale / previous, scale, factors)
        previous = scale


def _scale_before_norm(vae: nn.Module, conv1_scales: dict[str, float], factors: dict) -> None:
    """conv1 of a resnet reaches the rest only through norm2, so its output's scale is free (norm2's eps: as in
    _scale_stream)."""
    for name, scale in conv1_scales.items():
        layer = vae.get_submodule(name)
        _scale_layer(layer, name, scale, scale, factors)


def _probe_latents(reference: nn.Module, images: torch.Tensor | None) -> torch.Tensor:
    device = _device(reference)
    if images is not None:
        with torch.no_grad():
            return _encode(reference, images.to(device, torch.float32))
    # Pipelines decode latents / scaling_factor (+ shift_factor), and scaling_factor was fitted to make the encoder's
    # latents unit-variance: randn / scaling_factor is the range the decoder works in.
    config = reference.config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((PROBE_LATENTS[0], config.latent_channels) + PROBE_LATENTS[1:], generator=generator)
    return (latents / config.scaling_factor + (config.shift_factor or 0.0)).to(device)


def _decoder_maxima(reference: nn.Module, latents: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    with torch.no_grad(), ActivationMaxima(reference, parts=("decoder",)) as recorder:
        decoded = reference.decode(latents).sample
    return recorder.maxima, decoded


def _conv1_names(vae: nn.Module) -> list[str]:
    return [f"decoder.{name}.conv1" for name, module in vae.decoder.named_modules()
            if isinstance(module, ResnetBlock2D)]


def _plan(vae: nn.Module, maxima: dict[str, float], target: float) -> dict:
    stages = _stages(_stream_writers(vae.decoder), maxima)
    for stage in stages:
        stage["scale"] = _power_of_two_down(stage["max_abs"], target)
    latent_peak = maxima.get("post_quant_conv", 0.0)
    conv1 = {name: _power_of_two_down(maxima[name], target) for name in _conv1_names(vae) if name in maxima}
    values = {name: _power_of_two_down(maxima[f"{name}.to_v"], target) for name in _attention_names(vae)
              if f"{name}.to_v" in maxima}
    return dict(stages=stages, latent_scale=_power_of_two_down(latent_peak, target),
                conv1={name: scale for name, scale in conv1.items() if scale != 1.0},
                values={name: scale for name, scale in values.items() if scale != 1.0},
                queries=_query_scales(vae, maxima, target))


def _query_scales(vae: nn.Module, maxima: dict[str, float], target: float) -> dict[str, float]:
    """Per attention whose q or k exceeds target, the power of two c that best evens out c q and k / c (their dot
    products, hence the attention, do not change)."""
    scales = {}
    for name in _attention_names(vae):
        query, key = maxima.get(f"{name}.to_q", 0.0), maxima.get(f"{name}.to_k", 0.0)
        if max(query, key) > target and query > 0 and key > 0:
            if not math.isfinite(query * key):
                raise ValueError("an activation is not finite even in fp32: no rescaling can fix that")
            scale = 2.0 ** round(0.5 * math.log2(key / query))
            if scale != 1.0:
                scales[name] = scale
    return scales


def _attention_names(vae: nn.Module) -> list[str]:
    return [f"decoder.{name}" for name, module in vae.decoder.named_modules() if isinstance(module, Attention)]


def _scale_value_paths(vae: nn.Module, value_scales: dict[str, float], factors: dict) -> None:
    """An attention's output is linear in its values (softmax weights sum to one, then to_out): to_v's weight and bias
    scaled by s and to_out's weight by 1/s change nothing, with to_out's bias left as it is."""
    for name, scale in value_scales.items():
        attention = vae.get_submodule(name)
        _scale_layer(attention.to_v, f"{name}.to_v", scale, scale, factors)
        _scale_layer(attention.to_out[0], f"{name}.to_out.0", 1.0 / scale, 1.0, factors)


def _scale_query_key(vae: nn.Module, query_scales: dict[str, float], factors: dict) -> None:
    """q scaled by c and k by 1 / c, weights and biases alike: every q . k, and so the softmax, is unchanged."""
    for name, scale in query_scales.items():
        attention = vae.get_submodule(name)
        _scale_layer(attention.to_q, f"{name}.to_q", scale, scale, factors)
        _scale_layer(attention.to_k, f"{name}.to_k", 1.0 / scale, 1.0 / scale, factors)


def _largest_of(maxima: dict[str, float]) -> dict:
    name = max(maxima, key=maxima.get)
    return dict(name=name, max_abs=maxima[name])


def rescale_exact(vae: nn.Module, target: float = FP16_MAX / 8, images: torch.Tensor | None = None) -> tuple:
    """A copy of `vae` whose decoder activations that GroupNorms make scale-free are brought to `target` or below by
    powers of two, with the same output in exact arithmetic; and a dict of what was scaled and how it checked out.

    Five identities: a layer read only through a GroupNorm (a resnet's conv1) scales freely; so does the decoder's
    residual stream, stage by stage; an attention's value path (to_v up or down, to_out the other way); its queries
    against its keys (to_q one way, to_k the other); and, per channel, its group_norm's affine output against the
    to_q, to_k and to_v weights that read it.
    The maxima are measured on `images` ([-1, 1], encoded by the VAE) or, when None, on random latents. The encoder
    is never touched. What no identity reaches (a GroupNorm's affine output into a SiLU) is the fine-tune's case.
    The weights are scaled in the VAE's own dtype: pass it in fp32 (an fp16 weight scaled below 2^-14 loses bits).
    """
    _check_rescalable(vae)
    reference = _copy_as(vae, torch.float32)
    latents = _probe_latents(reference, images)
    linear = [path for path in norm_paths(reference) if not path.through_silu]
    before, decoded, peaks = _measure(reference, latents, [path.norm for path in linear])
    plan = _plan(reference, before, target)
    model, factors = copy.deepcopy(vae), {}
    _scale_stream(model, [stage["scale"] for stage in plan["stages"]], plan["latent_scale"], factors)
    _scale_before_norm(model, plan["conv1"], factors)
    _scale_value_paths(model, plan["values"], factors)
    _scale_query_key(model, plan["queries"], factors)
    channels = _scale_norm_outputs(model, linear, peaks, target)
    changed = bool(factors or channels)
    result = dict(changed=changed, target=target, factors=factors, channels=channels, stages=plan["stages"],
                  latent_scale=plan["latent_scale"], largest_before=_largest_of(before))
    result.update(_outcome(model, latents, (before, decoded) if not changed else None, decoded, target))
    return model, result


def _outcome(model: nn.Module, latents: torch.Tensor, unchanged, decoded: torch.Tensor, target: float) -> dict:
    """The rescaled model's largest decoder activation, the layers still above target, and how far its fp32 decode
    moved from `decoded` (the original's), in 8-bit levels. `unchanged`: the original's (maxima, decode) when the
    model is the original."""
    after, decoded_after = unchanged or _decoder_maxima(_copy_as(model, torch.float32), latents)
    return dict(largest_after=_largest_of(after), still_above_target=[name for name, peak in after.items()
                                                                      if peak > target],
                fp32_diff_levels=_max_abs_diff(decoded_after, decoded) * LEVELS)


# --- rescaling through a SiLU (approximate) -------------------------------------------------------------------------


class NormPath(NamedTuple):
    """A GroupNorm's affine output and the layers that read it: through a SiLU (a resnet's conv1 or conv2, conv_out),
    or directly (an attention's to_q, to_k and to_v, which are linear in it)."""
    norm: str
    readers: tuple
    through_silu: bool


def norm_paths(vae: nn.Module) -> list[NormPath]:
    """The decoder's GroupNorm outputs whose channels can move down by c while their readers' weights on those
    channels move up by 1/c: exact where the readers are linear, and at the cost of silu(x c) / c != silu(x) where a
    SiLU sits between (small where |x c| is far from 1)."""
    decoder, paths = vae.decoder, []
    for name, module in decoder.named_modules(prefix="decoder"):
        if isinstance(module, ResnetBlock2D) and isinstance(module.nonlinearity, nn.SiLU) and not (
                module.up or module.down or module.time_emb_proj is not None):
            paths += [NormPath(f"{name}.norm1", (f"{name}.conv1",), True),
                      NormPath(f"{name}.norm2", (f"{name}.conv2",), True)]
        elif isinstance(module, Attention) and module.spatial_norm is None and not module.is_cross_attention:
            paths.append(NormPath(f"{name}.group_norm", (f"{name}.to_q", f"{name}.to_k", f"{name}.to_v"), False))
    if isinstance(getattr(decoder, "conv_act", None), nn.SiLU):
        paths.append(NormPath("decoder.conv_norm_out", ("decoder.conv_out",), True))
    return [path for path in paths if _affine_group_norm(vae.get_submodule(path.norm))
            and all(isinstance(vae.get_submodule(reader), (nn.Conv2d, nn.Linear)) for reader in path.readers)]


def _affine_group_norm(module: nn.Module | None) -> bool:
    return isinstance(module, nn.GroupNorm) and module.affine


def _measure(reference: nn.Module, latents: torch.Tensor, norms: list[str]) -> tuple:
    """One fp32 decode of `latents`: (each decoder module's max |output|, the decode, max |output| of each channel
    (dimension 1) of the named norms)."""
    peaks: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            others = [d for d in range(output.dim()) if d != 1]
            peak = torch.nan_to_num(output.detach().abs().amax(dim=others).float(), nan=math.inf)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return hook
    handles = [reference.get_submodule(name).register_forward_hook(record(name)) for name in norms]
    try:
        maxima, decoded = _decoder_maxima(reference, latents)
    finally:
        for handle in handles:
            handle.remove()
    return maxima, decoded, peaks


def _channel_scales(peaks: torch.Tensor, target: float, threshold: float | None = None) -> torch.Tensor:
    """Per channel, _power_of_two_down of its peak, for the channels above threshold (default: target)."""
    if not bool(peaks.isfinite().all()):
        raise ValueError("an activation is not finite even in fp32: no rescaling can fix that")
    steps = torch.ceil(torch.log2(peaks.clamp_min(1e-30) / target)).clamp_min(0)
    steps[peaks <= (target if threshold is None else threshold)] = 0
    return torch.exp2(-steps)


def _scale_norm_outputs(model: nn.Module, paths: list[NormPath], peaks: dict, target: float,
                        threshold: float | None = None) -> dict:
    """Each path's channels above threshold (default: target) scaled down by powers of two to target or below (the
    GroupNorm's weight and bias) and its readers' weights on them up, in place; returns what was scaled, by norm."""
    scaled = {}
    with torch.no_grad():
        for path in paths:
            scales = _channel_scales(peaks[path.norm], target, threshold)
            if bool((scales == 1).all()):
                continue
            norm = model.get_submodule(path.norm)
            norm.weight.mul_(scales.to(norm.weight))
            norm.bias.mul_(scales.to(norm.bias))
            for reader in path.readers:  # (out, in, ...) weights: the input channels are dimension 1
                weight = model.get_submodule(reader).weight
                weight.div_(scales.to(weight).view(1, -1, *[1] * (weight.dim() - 2)))
            scaled[path.norm] = dict(readers=list(path.readers), through_silu=path.through_silu,
                                     channels=int((scales < 1).sum()), smallest_scale=float(scales.min()))
    return scaled


def rescale_through_silu(vae: nn.Module, target: float = FP16_MAX / 8, images: torch.Tensor | None = None,
                         threshold: float | None = None) -> tuple:
    """A copy of `vae` in which each decoder GroupNorm channel whose affine output, read by a SiLU, exceeds
    `threshold` (default: `target`) has its scale and shift divided by a power of two that brings it to `target` or
    below, and the next conv's weights on that channel multiplied by it; and a dict of what was scaled and how far
    the fp32 output moved (not exact: silu(x c) / c differs from silu(x) by up to 0.28 / c near x = -1.28 / c, so
    the cost is small when the overflowing values sit far from zero). A target below the threshold trades some of
    that cost for larger weights in the conv: weights below 2^-14 lose bits in fp16.
    Measured on `images` ([-1, 1]) or random latents, as rescale_exact; the encoder is never touched."""
    return next(rescalings_through_silu(vae, [target], images, threshold))


def rescalings_through_silu(vae: nn.Module, targets, images: torch.Tensor | None = None,
                            threshold: float | None = None):
    """rescale_through_silu's (model, result) for each target in turn, from one measurement of `vae`, made only as
    the caller asks for the next (threshold default: each target)."""
    _check_rescalable(vae)
    reference = _copy_as(vae, torch.float32)
    latents = _probe_latents(reference, images)
    paths = [path for path in norm_paths(reference) if path.through_silu]
    before, decoded, peaks = _measure(reference, latents, [path.norm for path in paths])
    for target in targets:
        model = copy.deepcopy(vae)
        scaled = _scale_norm_outputs(model, paths, peaks, target, threshold)
        result = dict(changed=bool(scaled), target=target, threshold=target if threshold is None else threshold,
                      scaled=scaled, largest_before=_largest_of(before))
        result.update(_outcome(model, latents, (before, decoded) if not scaled else None, decoded, target))
        yield model, result


# --- overflowing VAEs for tests and benchmarks ---------------------------------------------------------------------

OVERFLOW_KINDS = ("before-norm", "residual", "attention", "query-key", "attention-norm", "norm-affine")


def _small_vae(seed: int) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):  # the seed is this VAE's, not the caller's whole process's
        torch.manual_seed(seed)
        return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, layers_per_block=1,
                             sample_size=64).eval()


def _power_of_two_up(peak: float, margin: float) -> float:
    """The smallest 2^k that takes peak `margin` times past FP16_MAX."""
    return 2.0 ** math.ceil(math.log2(margin * FP16_MAX / peak))


def _check_fits(vae: nn.Module, kind: str) -> None:
    # An fp16 weight that is itself inf would be a different failure from the one each kind stands for.
    for name, param in vae.named_parameters():
        if param.abs().max() >= FP16_MAX:
            raise RuntimeError(f"overflowing_vae({kind!r}): {name} no longer fits fp16; try another seed")


def _overflow_attention(vae: nn.Module, maxima: dict[str, float], factors: dict) -> None:
    attention = vae.decoder.mid_block.attentions[0]
    prefix = "decoder.mid_block.attentions.0"
    scale = _power_of_two_up(maxima[f"{prefix}.to_v"], NORMALISED_MARGIN)
    # the attention output is linear in v (weight and bias alike): to_out's weight takes the scale back
    _scale_layer(attention.to_v, f"{prefix}.to_v", scale, scale, factors)
    _scale_layer(attention.to_out[0], f"{prefix}.to_out.0", 1.0 / scale, 1.0, factors)


def overflowing_vae(kind: str, seed: int = 0, base: AutoencoderKL | None = None) -> AutoencoderKL:
    """A small random-init AutoencoderKL (or a copy of `base`) whose fp16 decode is not finite. Five kinds keep the
    base's fp32 output (up to rounding), and rescale_exact undoes them: "before-norm" (decoder conv1s scaled up, read
    only through norm2), "residual" (the decoder's residual stream scaled up), "attention" (the mid-block's value
    path scaled up, to_out down), "query-key" (its queries scaled up, keys down), "attention-norm" (its group_norm's
    scale and shift up, to_q/to_k/to_v weights down). "norm-affine" is a VAE of its own:
    the first mid-block resnet's norm2 scale and shift multiplied up and its conv2 down, so its SiLU works on values
    past fp16's range (nearly a ReLU there): no identity moves that; rescale_through_silu nearly does."""
    if kind not in OVERFLOW_KINDS:
        raise ValueError(f"unknown overflow kind {kind!r}: choose from {OVERFLOW_KINDS}")
    vae = _small_vae(seed) if base is None else copy.deepcopy(base)  # base: another architecture (eval/bench_fp16)
    maxima, _ = _decoder_maxima(vae, _probe_latents(vae, None))
    factors: dict[str, float] = {}
    if kind == "before-norm":
        scales = {name: _power_of_two_up(maxima[name], NORMALISED_MARGIN) for name in _conv1_names(vae)}
        _scale_before_norm(vae, scales, factors)
    elif kind == "residual":
        # a factor per stage, each from its own maxima: every stage overflows, and no weight grows more than needed
        stages = _stages(_stream_writers(vae.decoder), maxima)
        scales = [_power_of_two_up(stage["max_abs"], STREAM_MARGIN) for stage in stages]
        _scale_stream(vae, scales, 1.0, factors)
    elif kind == "attention":
        _overflow_attention(vae, maxima, factors)
    elif kind == "query-key":
        name = "decoder.mid_block.attentions.0"
        _scale_query_key(vae, {name: _power_of_two_up(maxima[f"{name}.to_q"], NORMALISED_MARGIN)}, factors)
    elif kind == "attention-norm":
        name = "decoder.mid_block.attentions.0"
        attention, scale = vae.get_submodule(name), _power_of_two_up(maxima[f"{name}.group_norm"], NORMALISED_MARGIN)
        _scale_layer(attention.group_norm, f"{name}.group_norm", scale, scale, factors)
        for reader in ("to_q", "to_k", "to_v"):  # linear in the normalised input: the weights take the scale back
            _scale_layer(getattr(attention, reader), f"{name}.{reader}", 1.0 / scale, 1.0, factors)
    else:
        name = "decoder.mid_block.resnets.0"
        resnet, scale = vae.get_submodule(name), _power_of_two_up(maxima[f"{name}.norm2"], NORMALISED_MARGIN)
        _scale_layer(resnet.norm2, f"{name}.norm2", scale, scale, factors)
        _scale_layer(resnet.conv2, f"{name}.conv2", 1.0 / scale, 1.0, factors)
    _check_fits(vae, kind)
    return vae
