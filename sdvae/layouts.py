"""The key layouts of a VAE's weights: the original LDM one that single-file loaders read and diffusers' (both
ways), and TAESD's own two files for a tiny student. Plain renaming of state-dict keys: no model is built here."""
from __future__ import annotations

# (LDM, diffusers) name pieces, replaced in this order both ways: the mid-block names before the generic ones.
LAYOUT = [
    ("encoder.down.", "encoder.down_blocks."),
    ("mid.block_1.", "mid_block.resnets.0."),
    ("mid.block_2.", "mid_block.resnets.1."),
    ("mid.attn_1.", "mid_block.attentions.0."),
    (".block.", ".resnets."),
    ("downsample.", "downsamplers.0."),
    ("upsample.", "upsamplers.0."),
    ("nin_shortcut", "conv_shortcut"),
    ("norm_out", "conv_norm_out"),
]
ATTENTION = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
OLD_DIFFUSERS_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def is_ldm_layout(state: dict) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.block_1.")) for k in state)


def _convert(state: dict, to_diffusers: bool) -> dict:
    """Rename every key between the two layouts; the decoder's up blocks run in opposite orders in them and
    the attention projections are 1x1 convolutions in LDM, linear layers in diffusers."""
    up_from, up_to = ("decoder.up.", "decoder.up_blocks.") if to_diffusers else ("decoder.up_blocks.", "decoder.up.")
    attention = "mid_block.attentions.0." if to_diffusers else "mid.attn_1."
    pairs = LAYOUT if to_diffusers else [(b, a) for a, b in LAYOUT]
    names = ATTENTION if to_diffusers else {b: a for a, b in ATTENTION.items()}
    levels = len({k.split(".")[2] for k in state if k.startswith(up_from)})
    out = {}
    for key, value in state.items():
        if key.startswith(up_from):
            index, rest = key[len(up_from):].split(".", 1)
            key = f"{up_to}{levels - 1 - int(index)}.{rest}"
        for a, b in pairs:
            key = key.replace(a, b)
        if attention in key:
            head, tail = key.split(attention)
            old = next((n for n in names if tail.startswith(n)), None)
            key = head + attention + (names[old] + tail[len(old):] if old else tail)
            if value.ndim == 4 and to_diffusers:
                value = value[:, :, 0, 0]
            elif value.ndim == 2 and not to_diffusers:
                value = value[:, :, None, None]
        out[key] = value
    return out


def ldm_to_diffusers(state: dict) -> dict:
    """Original LDM layout (`encoder.down.N.block.M`, `mid.attn_1.q`, reversed `decoder.up`) -> diffusers."""
    return _convert(state, to_diffusers=True)


def diffusers_to_ldm(state: dict) -> dict:
    """diffusers AutoencoderKL keys -> the original LDM layout that single-file loaders read."""
    return _convert(state, to_diffusers=False)


# madebyollin/taesd's files (taesd_encoder / taesd_decoder .safetensors: what ComfyUI reads from models/vae_approx
# for previews) hold AutoencoderTiny's `encoder.layers` and `decoder.layers` as bare nn.Sequential indices; the
# decoder's are one higher, after the parameterless clamp that diffusers applies outside `layers`.
TAESD_PARTS = {"encoder": ("encoder.layers.", 0), "decoder": ("decoder.layers.", 1)}


def tiny_to_taesd(state: dict) -> dict[str, dict]:
    """AutoencoderTiny keys -> {"encoder": ..., "decoder": ...} in TAESD's layout."""
    parts = {part: {} for part in TAESD_PARTS}
    for key, value in state.items():
        part = key.split(".")[0]
        prefix, offset = TAESD_PARTS[part]
        index, rest = key[len(prefix):].split(".", 1)
        parts[part][f"{int(index) + offset}.{rest}"] = value
    return parts


def taesd_to_tiny(encoder: dict, decoder: dict) -> dict:
    """TAESD's two state dicts -> AutoencoderTiny keys."""
    state = {}
    for part, tensors in (("encoder", encoder), ("decoder", decoder)):
        prefix, offset = TAESD_PARTS[part]
        for key, value in tensors.items():
            index, rest = key.split(".", 1)
            state[f"{prefix}{int(index) - offset}.{rest}"] = value
    return state


def modernise_diffusers_keys(state: dict) -> dict:
    """diffusers before 0.14 named the VAE attention query/key/value/proj_attn."""
    out = {}
    for key, value in state.items():
        for old, new in OLD_DIFFUSERS_ATTENTION.items():
            key = key.replace(".attentions.0." + old, ".attentions.0." + new)
        out[key] = value
    return out


