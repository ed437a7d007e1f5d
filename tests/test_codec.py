import numpy as np
import pytest
import torch
from PIL import Image

import sdvae
from sdvae.images import load_photo
from sdvae.models import build_vae


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    torch.manual_seed(0)
    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return sdvae.load_vae(str(folder))


def photo(w=61, h=45):
    return Image.fromarray(load_photo("astronaut")).resize((w, h))


def test_any_size_is_padded_and_cropped_back(codec):
    image = photo(61, 45)
    z = codec.encode([image])
    assert z.shape == (1, 4, 6, 8)  # ceil(45/8), ceil(61/8)
    out = codec.decode(z, size=image.size)
    assert isinstance(out[0], Image.Image) and out[0].size == (61, 45)
    assert codec.decode(z, output_type="np").shape == (1, 48, 64, 3)
    assert codec.encode(photo(5, 3)).shape == (1, 4, 1, 1)  # too small to reflect: the edge is repeated
    pt = codec.decode(z, size=(61, 45), output_type="pt")
    assert pt.shape == (1, 3, 45, 61) and pt.min() >= -1 and pt.max() <= 1


def test_pil_numpy_and_tensor_inputs_agree(codec):
    image = photo(32, 24)
    array = np.array(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
    a, b, c = codec.encode(image), codec.encode([array]), codec.encode(tensor[None])
    assert torch.equal(a, b) and torch.equal(a, c)
    assert codec.encode([image.convert("L")]).shape == a.shape  # greyscale becomes RGB


def test_scaling_and_sampling(codec):
    image = photo(32, 32)
    raw = codec.encode(image, scaled=False)
    torch.testing.assert_close(codec.encode(image), (raw - 0.1) * 0.5)
    s1 = codec.encode(image, sample=True, generator=torch.Generator().manual_seed(3))
    s2 = codec.encode(image, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.equal(s1, codec.encode(image))
    direct = codec.model.decode(raw).sample.clamp(-1, 1)  # decode undoes the scaling
    torch.testing.assert_close(codec.decode(codec.encode(image), output_type="pt"), direct)


def test_clear_errors(codec):
    with pytest.raises(ValueError, match="one size"):
        codec.encode([photo(32, 32), photo(40, 32)])
    with pytest.raises(ValueError, match="output_type"):
        codec.decode(torch.zeros(1, 4, 2, 2), output_type="jpg")
    with pytest.raises(ValueError, match="uint8"):
        codec.encode(np.zeros((8, 8, 3), dtype=np.float32))


def test_encode_decode_commands_keep_original_sizes(tmp_path, codec):
    from sdvae.cli import main

    images = tmp_path / "images"
    images.mkdir()
    photo(61, 45).save(images / "a.png")
    photo(40, 72).save(images / "b.jpg")
    (images / "broken.png").write_bytes(b"not a png")
    vae_dir = tmp_path / "vae"
    codec.model.save_pretrained(vae_dir)
    assert main(["encode", str(images), "--vae", str(vae_dir), "--out", str(tmp_path / "latents")]) == 0
    assert sorted(p.name for p in (tmp_path / "latents").glob("*.safetensors")) == ["a.safetensors", "b.safetensors"]
    assert main(["decode", str(tmp_path / "latents"), "--vae", str(vae_dir), "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (61, 45)
    assert Image.open(tmp_path / "out" / "b.png").size == (40, 72)
    assert main(["decode", str(tmp_path / "latents"), "--vae", str(vae_dir), "--out", str(tmp_path / "tiled"),
                 "--tiled", "--tile-size", "16"]) == 0
    untiled, tiled = (np.array(Image.open(tmp_path / d / "a.png"), dtype=int) for d in ("out", "tiled"))
    assert np.abs(untiled - tiled).max() <= 1  # the same image, to one 8-bit level of rounding


@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_honours_force_upcast(tmp_path, force_upcast):
    torch.manual_seed(0)
    vae = build_vae("tiny")
    vae.register_to_config(force_upcast=force_upcast)
    vae.save_pretrained(tmp_path)
    half = sdvae.load_vae(str(tmp_path), dtype=torch.float16)
    full = sdvae.load_vae(str(tmp_path))
    assert half.model.encoder.conv_in.weight.dtype == torch.float16
    assert half.model.decoder.conv_out.weight.dtype == (torch.float32 if force_upcast else torch.float16)
    z = full.encode(photo(32, 32))
    a, b = half.decode(z, output_type="pt"), full.decode(z, output_type="pt")
    if force_upcast:
        torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all() and (a - b).abs().max() < 0.05


def test_channels_last_gives_the_same_latents(tmp_path, codec):
    codec.model.save_pretrained(tmp_path)
    cl = sdvae.load_vae(str(tmp_path), channels_last=True)
    torch.testing.assert_close(cl.encode(photo(32, 32)), codec.encode(photo(32, 32)), atol=1e-5, rtol=1e-5)


# --- seam-free tiling -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile_size", [16, 40])  # 16: a 2-D grid of square tiles; 40: full-width bands
def test_tiled_encode_and_decode_match_untiled_on_a_photo(codec, tile_size):
    image = photo(203, 131)  # padded to 208 x 136
    z = codec.encode(image, tiled=False)
    z_tiled = codec.encode(image, tiled=True, tile_size=tile_size)
    assert (z_tiled - z).abs().max() < 1e-4
    x = codec.decode(z, output_type="pt", tiled=False)
    x_tiled = codec.decode(z, output_type="pt", tiled=True, tile_size=tile_size)
    assert x_tiled.shape == x.shape == (1, 3, 136, 208)
    assert (x_tiled - x).abs().max() < 1e-4
    # diffusers' own tiling, which normalises each tile on its own, is far from the untiled result
    vae = codec.model
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
    try:
        blended = vae.decode(z / codec.scaling_factor + codec.shift_factor)
    finally:
        vae.disable_tiling()
    blended = blended.sample.clamp(-1, 1)
    assert (blended - x).abs().max() > 100 * (x_tiled - x).abs().max()


@pytest.mark.slow
def test_tiled_decode_of_the_sd_architecture_and_spilling_to_disk(monkeypatch):
    from sdvae import tiling

    torch.manual_seed(0)
    vae = build_vae("sd-kl-f8").eval().to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 12, 17)
    with torch.no_grad():
        reference = vae.decode(z).sample
    spilled = []
    close = tiling.MemoryBudget.close
    monkeypatch.setattr(tiling.MemoryBudget, "close", lambda self: (spilled.append(self.spilled), close(self))[1])
    in_memory = tiling.tiled_decode(vae, z, tile_size=32)
    on_disk = tiling.tiled_decode(vae, z, tile_size=32, max_memory=0)
    assert spilled[0] == 0 and spilled[1] > 0
    assert (in_memory - reference).abs().max() < 2e-4
    assert (on_disk - reference).abs().max() < 2e-4


def test_whole_image_statistics_survive_a_large_mean():
    from sdvae.tiling import ChannelStats

    torch.manual_seed(0)
    x = torch.randn(2, 8, 40, 40) * 0.01 + torch.arange(8.0).view(1, 8, 1, 1) * 30  # mean/std up to 21000
    norm = torch.nn.GroupNorm(4, 8)
    stats = ChannelStats()
    for rows in x.split(7, dim=2):
        for tile in rows.split(9, dim=3):
            stats.update(tile)
    mean, rstd = stats.group_norm(norm)
    torch.testing.assert_close((x - mean) * rstd, norm(x), atol=2e-3, rtol=0)


def test_tiling_is_chosen_when_the_untiled_pass_would_not_fit(codec, monkeypatch):
    from sdvae import codec as codec_module

    calls = []
    real = codec_module.tiled_decode
    monkeypatch.setattr(codec_module, "tiled_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    z = codec.encode(photo(64, 64))
    codec.decode(z)
    assert not calls
    small = sdvae.VAECodec(codec.model, codec.device, codec.dtype, max_memory=10_000)
    torch.testing.assert_close(small.decode(z, output_type="pt"), codec.decode(z, output_type="pt"), atol=1e-4, rtol=0)
    assert calls


def test_per_channel_latents_mean_and_std_are_used(tmp_path):
    """Playground v2.5-style configs scale per channel: (z - latents_mean) * scaling_factor / latents_std, as its
    diffusers pipeline and training scripts do; the scalar factors alone give latents on the wrong scale."""
    torch.manual_seed(0)
    vae = build_vae("tiny")
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 4.0]
    vae.register_to_config(scaling_factor=0.5, latents_mean=mean, latents_std=std)
    vae.save_pretrained(tmp_path)
    codec = sdvae.load_vae(str(tmp_path))
    image = photo(32, 32)
    raw = codec.encode(image, scaled=False)
    view = lambda v: torch.tensor(v).view(1, 4, 1, 1)
    torch.testing.assert_close(codec.encode(image), (raw - view(mean)) * 0.5 / view(std))
    direct = codec.model.decode(raw).sample.clamp(-1, 1)  # decode undoes the per-channel scaling
    torch.testing.assert_close(codec.decode(codec.encode(image), output_type="pt"), direct, atol=1e-5, rtol=0)


def test_encode_files_keeps_images_of_the_same_name_apart(tmp_path, codec):
    from sdvae.codec import decode_files, encode_files

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    photo(40, 32).save(images / "a.png")
    photo(24, 48).save(images / "sub" / "a.png")  # same name, other folder: not overwritten by the first
    assert encode_files(codec, [images], tmp_path / "latents") == (2, [])
    assert decode_files(codec, [tmp_path / "latents"], tmp_path / "out") == (2, [])
    assert Image.open(tmp_path / "out" / "a.png").size == (40, 32)
    assert Image.open(tmp_path / "out" / "sub" / "a.png").size == (24, 48)
    photo(40, 32).save(images / "a.jpg")  # would write a.safetensors too: refused before anything is encoded
    with pytest.raises(ValueError, match="a.jpg"):
        encode_files(codec, [images], tmp_path / "clash")


def test_fp16_force_upcast_without_quant_convs(tmp_path):
    """FLUX.1's VAE: use_quant_conv=False (quant_conv is None) and force_upcast=True."""
    from diffusers import AutoencoderKL

    from sdvae.presets import preset_config

    torch.manual_seed(0)
    AutoencoderKL(**preset_config("tiny"), use_quant_conv=False, use_post_quant_conv=False).save_pretrained(tmp_path)
    half = sdvae.load_vae(str(tmp_path), dtype=torch.float16)
    assert half.model.quant_conv is None and half.decode_dtype == torch.float32
    full = sdvae.load_vae(str(tmp_path))
    assert (half.encode(photo(32, 32)) - full.encode(photo(32, 32))).abs().max() < 0.05
