import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sdvae
from sdvae.cache import LatentCache, build_cache, bucket_sizes
from sdvae.data import open_image
from sdvae.demo import load_photo

# (name, photo, width, height): squares, 2:1, 4:1 and portraits, so several buckets at 64 px
IMAGES = [("sq-a.png", "astronaut", 96, 96), ("sq-b.jpg", "chelsea", 72, 72), ("sq-c.png", "coffee", 64, 64),
          ("wide-a.png", "rocket", 96, 48), ("wide-b.jpg", "motorcycle", 120, 60), ("wide-c.png", "chelsea", 100, 56),
          ("pano-a.png", "astronaut", 160, 40), ("pano-b.png", "coffee", 128, 32),
          ("tall-a.png", "chelsea", 48, 96), ("tall-b.jpg", "rocket", 60, 110),
          ("sub/tall-c.png", "astronaut", 40, 160),
          ("sub/sq-d.png", "motorcycle", 80, 76)]
FAST = dict(resolution=64, batch_size=4, num_workers=0, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions gain nothing from a second thread, and two threads on a busy 2-core machine are
    many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def codec(vae_dir):
    return sdvae.load_vae(str(vae_dir))


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    for name, photo, w, h in IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(load_photo(photo)).resize((w, h), Image.Resampling.LANCZOS).save(root / name)
    return root


def direct_posterior(codec, path, item, flipped=False):
    """What the cache should hold, computed here from the recorded resize and crop."""
    image = open_image(path).resize(item["resized_size"], Image.Resampling.LANCZOS).crop(item["crop_box"])
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
    return codec.posterior(x.flip(-1) if flipped else x)


def by_path(cache):
    return {cache[i]["path"]: cache[i] for i in range(len(cache))}


def assert_same_items(a, b):
    assert sorted(a) == sorted(b)
    for path in a:
        for name in ("mean", "std"):
            torch.testing.assert_close(a[path][name], b[path][name], rtol=0, atol=1e-6)
        assert a[path]["crop_box"] == b[path]["crop_box"] and a[path]["bucket"] == b[path]["bucket"]


def test_buckets():
    assert bucket_sizes(64, bucketing=False) == [(64, 64)]
    for resolution in (64, 256, 1024):
        sizes = bucket_sizes(resolution)
        step = 16 if resolution == 64 else 64
        assert (resolution, resolution) in sizes and len(sizes) == len(set(sizes)) > 1
        assert all(w % step == 0 and h % step == 0 and w * h <= resolution**2 and 0.25 <= w / h <= 4 for w, h in sizes)
        assert {(h, w) for w, h in sizes} == set(sizes)
    assert (1216, 832) in bucket_sizes(1024) and (2048, 512) in bucket_sizes(1024)  # SDXL's list has both


def test_latents_are_the_codec_posterior_of_the_recorded_crop(tmp_path, images, codec):
    report = build_cache(codec, images, tmp_path / "cache", **FAST)
    assert report["encoded"] == report["cached"] == len(IMAGES) and report["skipped"] == 0
    cache = LatentCache(tmp_path / "cache")
    items = by_path(cache)
    assert sorted(items) == sorted(name for name, *_ in IMAGES)
    for path, item in items.items():
        mean, std = direct_posterior(codec, images / path, item)
        torch.testing.assert_close(item["mean"], mean[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(item["std"], std[0], rtol=0, atol=1e-5)
        assert item["mean"].shape[-2:] == (item["bucket"][1] // 8, item["bucket"][0] // 8)
        assert item["original_size"] == Image.open(images / path).size
    # by hand: 96x48 (2:1) -> the 80x48 bucket, already covering it, centre crop 8 px in from each side
    wide = items["wide-a.png"]
    assert wide["bucket"] == (80, 48) and wide["resized_size"] == (96, 48)
    assert wide["crop_box"] == (8, 0, 88, 48) and wide["crop_box_original"] == (8, 0, 88, 48)
    # 160x40 (4:1) -> 128x32: scaled by 0.8, nothing cropped
    pano = items["pano-a.png"]
    assert pano["bucket"] == (128, 32) and pano["crop_box"] == (0, 0, 128, 32)
    assert pano["crop_box_original"] == (0, 0, 160, 40)
    # 60x110 portrait -> 48x80: scaled by 0.8 to 48x88, 4 px off the top
    tall = items["tall-b.jpg"]
    assert tall["bucket"] == (48, 80) and tall["resized_size"] == (48, 88) and tall["crop_box"] == (0, 4, 48, 84)
    assert tall["crop_box_original"] == (0, 5, 60, 105)
    assert items["sq-a.png"]["bucket"] == (64, 64) and items["sub/tall-c.png"]["bucket"] == (32, 128)
    assert len({item["bucket"] for item in items.values()}) == 5
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert all(len({tuple(s["bucket"])}) == 1 and s["rows"] >= 1 for s in index["shards"])
    assert len({tuple(s["bucket"]) for s in index["shards"]}) == len(index["shards"])  # one shard per bucket here

    square = build_cache(codec, images, tmp_path / "square", no_buckets=True, **FAST)
    assert square["encoded"] == len(IMAGES)
    assert {item["bucket"] for item in by_path(LatentCache(tmp_path / "square")).values()} == {(64, 64)}


def test_interrupted_run_resumes_where_it_stopped(tmp_path, images, codec):
    settings = dict(FAST, batch_size=2, shard_size=2, crop="random", seed=3)

    def stop(record):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        build_cache(codec, images, tmp_path / "cache", on_shard=stop, **settings)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert len(index["shards"]) == 1 and len(index["shards"][0]["entries"]) == 2
    # as if killed while writing the next shard: a temp file, and a shard the index does not name yet
    (tmp_path / "cache" / "shards" / ".shard-00001.safetensors.tmp").write_bytes(b"half")
    (tmp_path / "cache" / "shards" / "shard-00001.safetensors").write_bytes(b"never indexed")
    report = build_cache(codec, images, tmp_path / "cache", **dict(settings, num_workers=2))
    assert (report["encoded"], report["reused"], report["cached"]) == (len(IMAGES) - 2, 2, len(IMAGES))
    again = build_cache(codec, images, tmp_path / "cache", **settings)
    assert (again["encoded"], again["reused"]) == (0, len(IMAGES))

    whole = build_cache(codec, images, tmp_path / "whole", **settings)
    assert whole["encoded"] == len(IMAGES)
    assert_same_items(by_path(LatentCache(tmp_path / "cache")), by_path(LatentCache(tmp_path / "whole")))
    # the random crops are seeded per image, so they differ from the centre crops yet repeat exactly
    build_cache(codec, images, tmp_path / "centre", **FAST)
    centre, random = by_path(LatentCache(tmp_path / "centre")), by_path(LatentCache(tmp_path / "whole"))
    assert any(random[p]["crop_box"] != centre[p]["crop_box"] for p in random)


def test_changed_file_setting_or_vae_is_encoded_again(tmp_path, images, codec, vae_dir):
    out = tmp_path / "cache"
    build_cache(codec, images, out, **FAST)
    before = by_path(LatentCache(out))
    Image.fromarray(load_photo("coffee")).resize((96, 48)).save(images / "wide-a.png")  # new content, same name
    report = build_cache(codec, images, out, **FAST)
    assert (report["encoded"], report["reused"]) == (1, len(IMAGES) - 1)
    after = by_path(LatentCache(out))
    assert len(after) == len(IMAGES) and not torch.allclose(after["wide-a.png"]["mean"], before["wide-a.png"]["mean"])
    mean, _ = direct_posterior(codec, images / "wide-a.png", after["wide-a.png"])
    torch.testing.assert_close(after["wide-a.png"]["mean"], mean[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(after["sq-a.png"]["mean"], before["sq-a.png"]["mean"], atol=0, rtol=0)

    flipped = build_cache(codec, images, out, **dict(FAST, flip=True))  # the same images, now with --flip
    assert (flipped["encoded"], flipped["reused"]) == (len(IMAGES), 0)
    item = by_path(LatentCache(out))["tall-a.png"]
    mean, std = direct_posterior(codec, images / "tall-a.png", item, flipped=True)
    torch.testing.assert_close(item["mean_flipped"], mean[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(item["std_flipped"], std[0], atol=1e-5, rtol=0)
    smaller = build_cache(codec, images, out, **dict(FAST, flip=True, resolution=32))
    assert (smaller["encoded"], smaller["reused"]) == (len(IMAGES), 0)
    index = json.loads((out / "index.json").read_text())  # replaced shards are deleted
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(s["file"][7:] for s in index["shards"])

    other = sdvae.load_vae(str(vae_dir))
    with torch.no_grad():
        other.model.decoder.conv_out.bias.add_(0.1)  # decoder only: the latents are the same, the cache stays
    assert build_cache(other, images, out, **dict(FAST, flip=True, resolution=32))["encoded"] == 0
    with torch.no_grad():
        other.model.encoder.conv_in.bias.add_(0.01)
    assert build_cache(other, images, out, **dict(FAST, flip=True, resolution=32))["encoded"] == len(IMAGES)


def test_damaged_shard_is_named_on_load_and_redone_on_resume(tmp_path, images, codec):
    out = tmp_path / "cache"
    build_cache(codec, images, out, **dict(FAST, shard_size=2))
    original = {path: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
                for path, item in by_path(LatentCache(out)).items()}  # items map the shard file, changed below
    index = json.loads((out / "index.json").read_text())
    shard = index["shards"][1]
    path = out / shard["file"]
    blob = bytearray(path.read_bytes())
    blob[-20:-10] = bytes(b ^ 0xFF for b in blob[-20:-10])  # in the tensor data: still a readable file
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=shard["file"].split("/")[-1]):
        LatentCache(out)
    report = build_cache(codec, images, out, **dict(FAST, shard_size=2))
    assert [d["file"] for d in report["damaged_shards"]] == [shard["file"]]
    assert report["encoded"] == shard["rows"] and report["reused"] == len(IMAGES) - shard["rows"]
    assert_same_items(by_path(LatentCache(out)), original)


def test_unreadable_files_are_skipped_and_reported(tmp_path, images, vae_dir):
    from sdvae.cli import main

    buffer = io.BytesIO()
    Image.fromarray(load_photo("astronaut")).resize((64, 64)).save(buffer, "JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (images / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "cache"
    assert main(["cache-latents", "--vae", str(vae_dir), "--data", str(images), "--out", str(out),
                 "--resolution", "64", "--num-workers", "0", "--batch-size", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == 3 and report["encoded"] == report["cached"] == len(IMAGES)
    reasons = {s["path"]: s["reason"] for s in report["skipped_files"]}
    assert sorted(reasons) == ["empty.jpg", "random.png", "truncated.jpg"]
    assert "truncated" in reasons["truncated.jpg"] and "UnidentifiedImageError" in reasons["random.png"]
    assert report["vae_hash"] and report["settings"]["resolution"] == 64 and report["images_per_sec"] > 0
    assert len(LatentCache(out)) == len(IMAGES)

    (tmp_path / "nothing").mkdir()
    assert main(["cache-latents", "--vae", str(vae_dir), "--data", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "c2")]) == 2
    with pytest.raises(ValueError, match="no images"):
        build_cache(str(vae_dir), tmp_path / "nothing", tmp_path / "c2")
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        LatentCache(tmp_path / "nothing")


def test_torch_and_hf_datasets_agree_and_batches_hold_one_bucket(tmp_path, images, codec):
    build_cache(codec, images, tmp_path / "cache", flip=True, **FAST)
    cache = LatentCache(tmp_path / "cache")
    hf = cache.to_hf_dataset()
    assert len(hf) == len(cache) == len(IMAGES)
    for i in range(len(cache)):
        a, b = cache[i], hf[i]
        assert a["path"] == b["path"] and a["key"] == b["key"]
        for name in ("mean", "std", "mean_flipped", "std_flipped"):
            assert b[name].dtype == torch.float32 and torch.equal(a[name], b[name])
        for name in ("original_size", "crop_box", "bucket"):
            assert tuple(b[name].tolist()) == a[name]

    batches = cache.bucket_batches(3, seed=1)
    assert sorted(i for batch in batches for i in batch) == list(range(len(cache)))
    assert all(len({cache[i]["bucket"] for i in batch}) == 1 and 1 <= len(batch) <= 3 for batch in batches)
    assert batches == cache.bucket_batches(3, seed=1) and batches != cache.bucket_batches(3, seed=1, epoch=1)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=batches)
    assert sum(batch["mean"].shape[0] for batch in loader) == len(cache)

    item = cache[0]
    z = LatentCache.sample(item, torch.Generator().manual_seed(5))
    eps = torch.randn(item["mean"].shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, item["mean"] + item["std"] * eps)
    assert not torch.equal(z, LatentCache.sample(item, torch.Generator().manual_seed(6)))


def test_encoder_config_is_part_of_the_key(tmp_path, images, codec, vae_dir):
    """The same weights with other GroupNorm groups (e.g. a file that lost its norm_num_groups) make other
    latents: the cache must not serve the old ones."""
    out = tmp_path / "cache"
    build_cache(codec, images, out, **FAST)
    config = dict(codec.model.config, norm_num_groups=4)
    other = type(codec.model).from_config(config)
    other.load_state_dict(codec.model.state_dict())
    regrouped = sdvae.VAECodec(other.eval(), codec.device, codec.dtype)
    report = build_cache(regrouped, images, out, **FAST)
    assert report["encoded"] == len(IMAGES)
    item = by_path(LatentCache(out))["sq-a.png"]
    mean, _ = direct_posterior(regrouped, images / "sq-a.png", item)
    torch.testing.assert_close(item["mean"], mean[0], atol=1e-5, rtol=0)
