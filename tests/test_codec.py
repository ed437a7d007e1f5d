import numpy as np
import pytest
import torch
from PIL import Image

import sdvae
from sdvae.demo import load_photo
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
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == ["a.safetensors", "b.safetensors"]
    assert main(["decode", str(tmp_path / "latents"), "--vae", str(vae_dir), "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (61, 45)
    assert Image.open(tmp_path / "out" / "b.png").size == (40, 72)


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
