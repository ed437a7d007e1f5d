import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdvae
from sdvae.cache import build_cache, bucket_sizes
from sdvae.cache_reader import LatentShards
from sdvae.images import open_image
from sdvae.images import load_photo

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


def by_path(out) -> dict:
    """The cache's items by the image's path in its folder (keys are "<unit>/<path>")."""
    return {item["key"].split("/", 1)[1]: item for item in LatentShards(out, rank=0, world_size=1)}


def assert_same_items(a, b, atol=1e-5):  # batches of other images round otherwise
    assert sorted(a) == sorted(b)
    for path in a:
        for name in ("mean", "std"):
            torch.testing.assert_close(a[path][name], b[path][name], rtol=0, atol=atol)
        assert a[path]["crop_box"] == b[path]["crop_box"] and a[path]["bucket"] == b[path]["bucket"]


def shard_stats(out) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (Path(out) / "shards").glob("*.parquet")}


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
    manifest = report["manifest"]
    assert report["encoded"] == manifest["images"] == len(IMAGES) and report["skipped"] == 0
    items = by_path(tmp_path / "cache")
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
    assert manifest["factors"]["scaling_factor"] == codec.model.config.scaling_factor
    assert manifest["latent_channels"] == 4 and manifest["vae_hash"] and len(manifest["shards"]) == 1

    square = build_cache(codec, images, tmp_path / "square", no_buckets=True, **FAST)
    assert square["encoded"] == len(IMAGES)
    assert {item["bucket"] for item in by_path(tmp_path / "square").values()} == {(64, 64)}


def test_interrupted_run_resumes_and_leaves_finished_shards_alone(tmp_path, images, codec):
    settings = dict(FAST, batch_size=2, shard_size=3, crop="random", seed=3)

    def stop(record):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        build_cache(codec, images, tmp_path / "cache", on_shard=stop, **settings)
    first = shard_stats(tmp_path / "cache")
    assert len(first) == 1 and not list((tmp_path / "cache" / "claims").glob("*.json"))
    # as if killed while writing the next shard: a temp file, and a shard no completion record names
    (tmp_path / "cache" / "shards" / ".folder-000009.parquet.tmp").write_bytes(b"half")
    report = build_cache(codec, images, tmp_path / "cache", **dict(settings, num_workers=2))
    units = report["units"]
    assert (report["encoded_units"], report["reused_units"]) == (units - 1, 1)
    assert all(shard_stats(tmp_path / "cache")[name] == stat for name, stat in first.items())  # untouched
    again = build_cache(codec, images, tmp_path / "cache", **settings)
    assert (again["encoded_units"], again["reused_units"], again["encoded"]) == (0, units, 0)

    whole = build_cache(codec, images, tmp_path / "whole", **settings)
    assert whole["encoded"] == len(IMAGES)
    assert_same_items(by_path(tmp_path / "cache"), by_path(tmp_path / "whole"))
    # the random crops are seeded per image, so they differ from the centre crops yet repeat exactly
    build_cache(codec, images, tmp_path / "centre", **FAST)
    centre, random = by_path(tmp_path / "centre"), by_path(tmp_path / "whole")
    assert any(random[p]["crop_box"] != centre[p]["crop_box"] for p in random)


def test_changed_file_setting_or_vae_is_encoded_again(tmp_path, images, codec, vae_dir):
    out, settings = tmp_path / "cache", dict(FAST, shard_size=3)
    build_cache(codec, images, out, **settings)
    before = by_path(out)
    Image.fromarray(load_photo("coffee")).resize((96, 48)).save(images / "wide-a.png")  # new content, same name
    report = build_cache(codec, images, out, **settings)
    assert (report["encoded_units"], report["reused_units"]) == (1, report["units"] - 1)  # its slice only
    after = by_path(out)
    assert len(after) == len(IMAGES) and not torch.allclose(after["wide-a.png"]["mean"], before["wide-a.png"]["mean"])
    mean, _ = direct_posterior(codec, images / "wide-a.png", after["wide-a.png"])
    torch.testing.assert_close(after["wide-a.png"]["mean"], mean[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(after["sq-a.png"]["mean"], before["sq-a.png"]["mean"], atol=0, rtol=0)

    flipped = build_cache(codec, images, out, **dict(settings, flip=True))  # the same images, now with --flip
    assert (flipped["encoded"], flipped["reused_units"]) == (len(IMAGES), 0)
    item = by_path(out)["tall-a.png"]
    mean, std = direct_posterior(codec, images / "tall-a.png", item, flipped=True)
    torch.testing.assert_close(item["mean_flipped"], mean[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(item["std_flipped"], std[0], atol=1e-5, rtol=0)
    (images / "sub" / "sq-d.png").unlink()  # one image fewer: the slices after it change, and a unit goes
    fewer = build_cache(codec, images, out, **dict(settings, flip=True))
    assert sorted(p.stem for p in (out / "shards").glob("*.parquet")) == sorted(
        s["unit"] for s in fewer["manifest"]["shards"])  # the gone unit's shard is removed
    assert len(by_path(out)) == len(IMAGES) - 1

    other = sdvae.load_vae(str(vae_dir))
    with torch.no_grad():
        other.model.decoder.conv_out.bias.add_(0.1)  # decoder only: the latents are the same, the cache stays
    assert build_cache(other, images, out, **dict(settings, flip=True))["encoded"] == 0
    with torch.no_grad():
        other.model.encoder.conv_in.bias.add_(0.01)
    assert build_cache(other, images, out, **dict(settings, flip=True))["encoded"] == len(IMAGES) - 1


def test_damaged_shard_is_named_on_read_and_a_truncated_one_redone(tmp_path, images, codec):
    out = tmp_path / "cache"
    build_cache(codec, images, out, **dict(FAST, shard_size=4))
    original = by_path(out)
    shard = json.loads((out / "manifest.json").read_text())["shards"][1]
    path = out / shard["file"]
    blob = bytearray(path.read_bytes())
    blob[100:110] = bytes(b ^ 0xFF for b in blob[100:110])
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=Path(shard["file"]).name):
        by_path(out)
    path.write_bytes(bytes(blob[: len(blob) // 2]))  # truncated: the rerun sees it and encodes the unit again
    report = build_cache(codec, images, out, **dict(FAST, shard_size=4))
    assert [d["file"] for d in report["damaged_shards"]] == [shard["file"]]
    assert report["encoded"] == shard["rows"] and report["reused_units"] == report["units"] - 1
    assert_same_items(by_path(out), original)


def test_unreadable_files_are_skipped_and_reported(tmp_path, images, vae_dir, capsys):
    from sdvae.cli import main

    buffer = io.BytesIO()
    Image.fromarray(load_photo("astronaut")).resize((64, 64)).save(buffer, "JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (images / "random.png").write_bytes(np.random.default_rng(0).bytes(500))
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "cache"
    assert main(["cache-latents", "--vae", str(vae_dir), "--data", str(images), "--out", str(out),
                 "--resolution", "64", "--num-workers", "0", "--batch-size", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == 3 and manifest["images"] == len(IMAGES)
    [record] = [json.loads(p.read_text()) for p in (out / "done").glob("*.json")]
    reasons = {s["key"].split("/", 1)[1]: s["reason"] for s in record["skipped"]}
    assert sorted(reasons) == ["empty.jpg", "random.png", "truncated.jpg"]
    assert "truncated" in reasons["truncated.jpg"] and "UnidentifiedImageError" in reasons["random.png"]
    assert manifest["settings"]["resolution"] == 64 and len(by_path(out)) == len(IMAGES)
    assert "skipped folder-000000/random.png" in capsys.readouterr().err

    (tmp_path / "nothing").mkdir()
    assert main(["cache-latents", "--vae", str(vae_dir), "--data", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "c2")]) == 2
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        LatentShards(tmp_path / "nothing")


def test_batches_hold_one_bucket_and_ranks_split_the_rows(tmp_path, images, codec):
    build_cache(codec, images, tmp_path / "cache", flip=True, **dict(FAST, shard_size=3))
    shards = LatentShards(tmp_path / "cache", shuffle=True, seed=1, rank=0, world_size=1)
    batches = list(shards.batches(3))
    assert sum(len(b["key"]) for b in batches) == len(shards) == len(IMAGES)
    assert all(len(set(b["bucket"])) == 1 and b["mean"].shape[0] == len(b["key"]) <= 3 for b in batches)
    assert [b["key"] for b in batches] == [b["key"] for b in shards.batches(3)]  # the same epoch: the same order
    shards.set_epoch(1)
    assert [b["key"] for b in batches] != [b["key"] for b in shards.batches(3)]
    keys = [sorted(it["key"] for it in LatentShards(tmp_path / "cache", rank=r, world_size=2)) for r in (0, 1)]
    assert not set(keys[0]) & set(keys[1]) and len(keys[0]) + len(keys[1]) == len(IMAGES)
    loader = torch.utils.data.DataLoader(LatentShards(tmp_path / "cache", rank=0, world_size=1).batches(4),
                                         batch_size=None, num_workers=2)
    assert sum(len(b["key"]) for b in loader) == len(IMAGES)  # each worker its own shards

    item = next(iter(LatentShards(tmp_path / "cache")))
    z = LatentShards.sample(item, torch.Generator().manual_seed(5))
    eps = torch.randn(item["mean"].shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, item["mean"] + item["std"] * eps)
    assert not torch.equal(z, LatentShards.sample(item, torch.Generator().manual_seed(6)))


@pytest.mark.slow
def test_datasets_reads_the_cache_without_sdvae(tmp_path, images, codec):
    build_cache(codec, images, tmp_path / "cache", flip=True, **dict(FAST, shard_size=5))
    script = f"""
import sys, datasets, numpy as np
rows = list(datasets.load_dataset({str(tmp_path / "cache")!r}, streaming=True, split="train"))
assert "sdvae" not in sys.modules
for r in rows:
    w, h = r["bucket"]
    for name in ("mean", "std", "mean_flipped", "std_flipped"):
        assert np.asarray(r[name]).shape == (4, h // 8, w // 8), (name, np.asarray(r[name]).shape)
print(len(rows), len({{r["key"] for r in rows}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(len(IMAGES))] * 2
    mine = by_path(tmp_path / "cache")
    assert len(mine) == len(IMAGES)


def test_fp16_latents_are_half_the_size_within_their_rounding(tmp_path, images, codec):
    full = build_cache(codec, images, tmp_path / "fp32", **FAST)["manifest"]
    half = build_cache(codec, images, tmp_path / "fp16", latent_dtype="fp16", **FAST)["manifest"]
    assert sum(s["bytes"] for s in half["shards"]) < 0.75 * sum(s["bytes"] for s in full["shards"])
    a, b = by_path(tmp_path / "fp32"), by_path(tmp_path / "fp16")
    for path in a:
        assert b[path]["mean"].dtype == torch.float32  # read back as fp32
        error = (a[path]["mean"] - b[path]["mean"]).abs() / a[path]["mean"].abs().clamp(min=1e-3)
        assert float(error.max()) < 1e-3  # fp16 keeps 11 significant bits


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
    item = by_path(out)["sq-a.png"]
    mean, _ = direct_posterior(regrouped, images / "sq-a.png", item)
    torch.testing.assert_close(item["mean"], mean[0], atol=1e-5, rtol=0)


def test_a_cache_of_an_earlier_version_is_refused_with_what_to_do(tmp_path, images, codec):
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"format": 1, "shards": [], "vae_hash": "x"}))
    for attempt in (lambda: build_cache(codec, images, old, **FAST), lambda: LatentShards(old)):
        with pytest.raises(ValueError, match="earlier sdvae.*new"):
            attempt()


def test_a_unit_another_live_process_holds_is_left_to_it_and_a_dead_ones_is_taken(tmp_path, images, codec):
    import socket

    out, settings = tmp_path / "cache", dict(FAST, shard_size=4)
    (out / "claims").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim = dict(host=socket.gethostname(), pid=holder.pid, started=time.time())
        (out / "claims" / "folder-000001.json").write_text(json.dumps(claim))
        report = build_cache(codec, images, out, **settings)
        assert (report["busy_units"], report["encoded_units"], report["manifest"]) == (1, 2, None)
        assert not (out / "manifest.json").exists() and (out / "claims" / "folder-000001.json").is_file()
    finally:
        holder.kill()
        holder.wait()
    report = build_cache(codec, images, out, **settings)  # its holder is dead now: the claim is taken
    assert (report["busy_units"], report["encoded_units"], report["reused_units"]) == (0, 1, 2)
    assert report["manifest"]["images"] == len(IMAGES) and not list((out / "claims").iterdir())


def test_a_complete_cache_publishes_as_a_dataset_repo(tmp_path, images, codec, capsys, monkeypatch):
    from sdvae import publish as publishing
    from sdvae.cli import main

    out = tmp_path / "cache"
    build_cache(codec, images, out, **FAST)
    card = (out / "README.md").read_text()
    assert "data_files: shards/*.parquet" in card and f"{len(IMAGES)} images" in card and "scaling_factor" in card
    assert main(["publish", str(out), "--repo-id", "me/latents", "--dry-run"]) == 0
    assert "dataset repo me/latents" in capsys.readouterr().out
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw["repo_type"]))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_type"], kw["ignore_patterns"]))
            return "https://huggingface.co/datasets/me/latents/commit/1"

    monkeypatch.setattr(publishing, "HfApi", FakeApi)
    assert main(["publish", str(out), "--repo-id", "me/latents"]) == 0
    assert calls[0] == ("create", "me/latents", "dataset") and calls[1][1] == "dataset" and "claims/*" in calls[1][2]
    (out / "manifest.json").unlink()  # as if units were still being encoded
    assert main(["publish", str(out), "--repo-id", "me/latents", "--dry-run"]) == 2
    assert "incomplete" in capsys.readouterr().err
