"""The latent cache at scale, on small webdataset tar shards written here from real photos: torchrun ranks and
independent invocations on one --out give what one process gives, a run killed with SIGKILL finishes on the next
invocation without touching finished shards, and bad members, a truncated tar and an empty one are counted skips."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from sdvae.cache_reader import LatentShards
from sdvae.images import load_photo

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "immunohistochemistry")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SDVAE = [sys.executable, "-m", "sdvae"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def jpeg(photo: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(load_photo(photo)).resize(size, Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, shards: int = 4, per_shard: int = 5) -> Path:
    """img2dataset's layout: <key>.jpg and <key>.json per sample, in shards/00000.tar, 00001.tar, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                size = (64 + 16 * (i % 3), 64 + 8 * ((i + s) % 4))
                add(tar, f"{key}.jpg", jpeg(PHOTOS[(i + s) % len(PHOTOS)], size))
                add(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return folder


def cache_command(vae_dir, data, out, *extra) -> list[str]:
    return ["cache-latents", "--vae", str(vae_dir), "--data", str(data), "--out", str(out), "--resolution", "64",
            "--num-workers", "0", "--batch-size", "4", *extra]


def items(out) -> dict:
    return {it["key"]: it for it in LatentShards(out, rank=0, world_size=1)}


def assert_same(a: dict, b: dict, atol=1e-4):
    assert sorted(a) == sorted(b)
    for key in a:
        for name in ("mean", "std"):
            assert float((a[key][name] - b[key][name]).abs().max()) <= atol, (key, name)


@pytest.mark.slow
def test_torchrun_ranks_and_independent_invocations_give_what_one_process_gives(tmp_path, vae_dir):
    data = write_shards(tmp_path / "shards")
    pattern = str(data / "{00000..00003}.tar")
    one = subprocess.run([*SDVAE, *cache_command(vae_dir, pattern, tmp_path / "one")], env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "sdvae",
                            *cache_command(vae_dir, pattern, tmp_path / "ranks")], env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    both = [subprocess.Popen([*SDVAE, *cache_command(vae_dir, pattern, tmp_path / "two")], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in both]
    assert all(p.returncode == 0 for p in both), [err[-2000:] for _, err in outputs]
    reference = items(tmp_path / "one")
    assert len(reference) == 20
    for out in ("ranks", "two"):
        assert_same(items(tmp_path / out), reference)
        records = [json.loads(p.read_text()) for p in (tmp_path / out / "done").glob("*.json")]
        assert len(records) == 4 and not list((tmp_path / out / "claims").glob("*.json"))
    pids = {json.loads(p.read_text())["pid"] for p in (tmp_path / "two" / "done").glob("*.json")}
    print("units done by", len(pids), "of the two invocations")


@pytest.mark.slow
def test_a_killed_run_finishes_next_time_without_touching_finished_shards(tmp_path, vae_dir):
    data = write_shards(tmp_path / "shards", shards=8, per_shard=6)
    pattern = str(data / "*.tar")
    out = tmp_path / "cache"
    command = cache_command(vae_dir, pattern, out, "--batch-size", "1")  # small batches: time to kill it midway
    run = subprocess.Popen([*SDVAE, *command], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list((out / "done").glob("*.json")) if (out / "done").is_dir() else True:
        assert run.poll() is None and time.time() < deadline, "the run ended before its first shard"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.parquet")
                if (out / "done" / f"{p.stem}.json").is_file()}
    assert 1 <= len(finished) < 8 and not (out / "manifest.json").exists()
    again = subprocess.run([*SDVAE, *command], env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.parquet")}
    assert all(after[name] == stat for name, stat in finished.items())
    whole = subprocess.run([*SDVAE, *cache_command(vae_dir, pattern, tmp_path / "whole", "--batch-size", "1")],
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert_same(items(out), items(tmp_path / "whole"), atol=0)


def test_bad_members_a_truncated_tar_and_an_empty_one_are_counted_skips(tmp_path, vae_dir, capsys):
    from sdvae.cli import main

    data = write_shards(tmp_path / "shards", shards=2, per_shard=4)
    with tarfile.open(data / "00002.tar", "w") as tar:  # an undecodable image and a sample without one
        add(tar, "bad0.jpg", b"not a jpeg at all")
        add(tar, "text1.txt", b"just a caption")
        add(tar, "good2.jpg", jpeg("coffee", (64, 64)))
    blob = (data / "00001.tar").read_bytes()
    (data / "00001.tar").write_bytes(blob[: len(blob) * 2 // 3])  # cut inside a member
    with tarfile.open(data / "00003.tar", "w"):
        pass
    out = tmp_path / "cache"
    assert main(cache_command(vae_dir, str(data / "*.tar"), out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {s["key"]: s["reason"] for p in (out / "done").glob("*.json") for s in json.loads(p.read_text())["skipped"]}
    assert any(k.startswith("00002.tar/bad0") for k in skipped) and any(k.startswith("00002.tar/text1") for k in skipped)
    assert any(k.startswith("00001.tar") and "truncated" in r for k, r in skipped.items())
    assert any(k.startswith("00003.tar") and "empty" in r for k, r in skipped.items())
    keys = set(items(out))
    assert {k for k in keys if k.startswith("00000.tar/")} == {f"00000.tar/00000{i:04d}" for i in range(4)}
    assert "00002.tar/good2" in keys and any(k.startswith("00001.tar/") for k in keys)  # the part before the cut
    assert manifest["images"] == len(keys) and manifest["skipped"] == len(skipped)


def test_train_reads_tar_shards(tmp_path):
    from diffusers import AutoencoderKL

    from sdvae.cli import main

    data = write_shards(tmp_path / "shards", shards=4, per_shard=3)
    (data / "00002.tar").write_bytes((data / "00002.tar").read_bytes()[:3000])  # a truncated one: skipped, named
    run = tmp_path / "run"
    assert main(["train", f"data={data}/{{00000..00003}}.tar", f"output_dir={run}", "max_steps=3", "batch_size=2",
                 "resolution=32", "perceptual_weight=0", "num_workers=0", "preview_images=0"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["skipped_files"] >= 1
    assert AutoencoderKL.from_pretrained(run / "vae").config.latent_channels == 4


@pytest.mark.slow
def test_the_ray_engine_gives_what_one_process_gives(tmp_path, vae_dir):
    pytest.importorskip("ray", reason="Ray Data is the optional extra sdvae[ray]")
    data = write_shards(tmp_path / "shards", shards=3, per_shard=4)
    pattern = str(data / "*.tar")
    env = {**ENV, "RAY_ADDRESS": "", "RAY_DISABLE_USAGE_STATS": "1"}
    ray = subprocess.run([*SDVAE, *cache_command(vae_dir, pattern, tmp_path / "ray"), "--engine", "ray",
                          "--ray-actors", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert ray.returncode == 0, ray.stderr[-3000:]
    assert "3 of 3 input shards encoded here" in ray.stdout and "complete: 12 images" in ray.stdout, ray.stdout
    one = subprocess.run([*SDVAE, *cache_command(vae_dir, pattern, tmp_path / "one")], env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same(items(tmp_path / "ray"), items(tmp_path / "one"))
    pids = {json.loads(p.read_text())["pid"] for p in (tmp_path / "ray" / "done").glob("*.json")}
    assert os.getpid() not in pids and len(pids) >= 1  # the actors did the units


def test_a_ray_actor_encodes_only_the_units_it_is_handed_as_one_process_would(tmp_path, vae_dir):
    """The actor's work without a Ray cluster: it takes the units in its batch, no others, and reports them."""
    from sdvae.cache import CacheSettings, build_cache
    from sdvae.cache_ray import _UnitEncoder, build_cache_ray

    data = write_shards(tmp_path / "shards", shards=3, per_shard=2)
    settings = CacheSettings(resolution=64, num_workers=0, batch_size=4, backend="pytorch")
    actor = _UnitEncoder(str(vae_dir), str(data / "*.tar"), str(tmp_path / "actor"), settings)
    rows = actor({"unit": ["00001.tar"]})
    assert rows["unit"] == ["00001.tar"] and rows["encoded"] == [2] and rows["encoded_units"] == [1]
    assert sorted(p.stem for p in (tmp_path / "actor" / "done").glob("*.json")) == ["00001.tar"]
    # the driver finishes what the actors left, as build_cache_ray does: the other two units, and the manifest
    rest = build_cache(str(vae_dir), str(data / "*.tar"), tmp_path / "actor", settings, progress=False)
    assert rest["encoded_units"] == 2
    build_cache(str(vae_dir), str(data / "*.tar"), tmp_path / "one", settings, progress=False)
    assert_same(items(tmp_path / "actor"), items(tmp_path / "one"))
    with pytest.raises(ValueError, match="--ray-actors must be at least 1"):
        build_cache_ray(str(vae_dir), str(data / "*.tar"), tmp_path / "x", settings, actors=0)
