"""Every command against a corpus of bad files and bad values: a one-line error (exit 2) or a named, counted skip;
never a traceback or a hang; the good files still processed; nothing written that claims success for a bad input.

The corpus is built here. Commands run in subprocesses where the process as a whole is what is judged (exit code,
stderr, a FIFO that must not block); the many fatal cases of one kind run through `sdvae.cli.main` in-process."""
import io
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdvae.cli import main
from tests.test_data import real_photo, write_real_world_files

SDVAE = [sys.executable, "-m", "sdvae"]
MAX_PIXELS = 60_000  # the corpus's "huge" image is over it, every other image under it
WEIRD_NAME = os.fsdecode(b"caf\xe9-latin1.png")  # not UTF-8
LONG_NAME = "x" * 245 + ".png"  # readable, but its latent file's name is over the file system's 255 bytes


def build_images(folder: Path) -> tuple[list[str], list[str]]:
    good, bad = write_real_world_files(folder)
    photo = real_photo()
    Image.fromarray(np.full((40, 50), 3.5, dtype=np.float32), "F").save(folder / "float_over_one.tif")
    photo.save(folder / WEIRD_NAME)
    photo.save(folder / LONG_NAME)
    photo.resize((400, 300)).save(folder / "huge.png")
    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    (folder / "cut_short.png").write_bytes(buffer.getvalue()[:-300])
    (folder / "dir.png").mkdir()  # a folder with an image's name: not a file, not an input
    os.mkfifo(folder / "pipe.png")  # a FIFO: reading it would block for ever
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    return good + ["float_over_one.tif", WEIRD_NAME], bad + ["cut_short.png", "huge.png"]


def safetensors_with(header_length: int, body: bytes) -> bytes:
    return struct.pack("<Q", header_length) + body


def build_vaes(root: Path, vae_dir: Path) -> dict[str, Path]:
    """Broken VAEs of every kind the loaders meet: files, folders, configs. name -> path."""
    weights = (vae_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    config = json.loads((vae_dir / "config.json").read_text())
    cases = {}
    files = {"truncated.safetensors": weights[: len(weights) // 3], "empty.safetensors": b"",
             "garbage.safetensors": np.random.default_rng(1).bytes(5000),
             "absurd_header.safetensors": safetensors_with(2**60, b"{}"),
             "header_not_json.safetensors": safetensors_with(6, b"{nope!"),
             "truncated.ckpt": b"PK\x03\x04" + b"\0" * 100}
    for name, data in files.items():
        (root / name).write_bytes(data)
        cases[name] = root / name
    bad_configs = {"zero_scaling": dict(config, scaling_factor=0), "nan_scaling": dict(config, scaling_factor=math.nan),
                   "string_scaling": dict(config, scaling_factor="0.18"), "bad_blocks": dict(config, block_out_channels="abc"),
                   "negative_latents": dict(config, latent_channels=-1),
                   "unknown_block": dict(config, down_block_types=["CrossAttnDownBlock2D"] * 4),
                   "list_config": [1, 2], "groups_mismatch": dict(config, norm_num_groups=7)}
    for name, value in bad_configs.items():
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(value))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights)
        cases[name] = folder
    (root / "bad_json").mkdir()
    (root / "bad_json" / "config.json").write_text('{"scaling_factor": 0.18,')
    cases["bad_json"] = root / "bad_json"
    (root / "truncated_weights").mkdir()
    (root / "truncated_weights" / "config.json").write_text(json.dumps(config))
    (root / "truncated_weights" / "diffusion_pytorch_model.safetensors").write_bytes(weights[:-1000])
    cases["truncated_weights"] = root / "truncated_weights"
    cases["missing"] = root / "does-not-exist"
    (root / "weights.gguf").write_bytes(weights[:100])  # a file, but no VAE format
    cases["weights.gguf"] = root / "weights.gguf"
    os.mkfifo(root / "pipe.safetensors")  # would block whoever opens it
    cases["pipe.safetensors"] = root / "pipe.safetensors"
    return cases


def build_latents(folder: Path, vae_dir: Path, photos: Path) -> tuple[list[str], list[str]]:
    assert main(["encode", str(photos), "--vae", str(vae_dir), "--out", str(folder)]) == 0
    good = sorted(p.name for p in folder.glob("*.safetensors"))
    z = load_file(folder / good[0])["latent"]
    meta = {"width": "20", "height": "20", "scaled": "True"}
    cases = {"nan": ({"latent": z * math.nan}, meta), "inf": ({"latent": z + math.inf}, meta),
             "negative_width": ({"latent": z}, dict(meta, width="-5")), "width_only": ({"latent": z}, {"width": "20"}),
             "too_wide": ({"latent": z}, dict(meta, width=str(8 * z.shape[-1] + 9))),
             "rank4": ({"latent": z[None]}, meta), "channels3": ({"latent": z[:3]}, meta),
             "ints": ({"latent": z.to(torch.int32)}, meta), "no_latent": ({"other": z}, meta),
             "bad_scaled": ({"latent": z}, dict(meta, scaled="maybe"))}
    for name, (tensors, metadata) in cases.items():
        save_file(tensors, folder / f"{name}.safetensors", metadata=metadata)
    (folder / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    data = (folder / good[0]).read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) - 50])
    return good, [*cases, "garbage", "truncated"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, vae_dir):
    root = tmp_path_factory.mktemp("corpus")
    images, photos, vaes = root / "images", root / "photos", root / "vaes"
    good, bad = build_images(images)
    photos.mkdir()
    for name in ("a", "b"):
        real_photo().save(photos / f"{name}.png")
    vaes.mkdir()
    good_latents, bad_latents = build_latents(root / "latents", vae_dir, photos)
    return dict(root=root, images=images, good=good, bad=bad, photos=photos, vaes=build_vaes(vaes, vae_dir),
                latents=root / "latents", good_latents=good_latents, bad_latents=bad_latents, vae=vae_dir)


def sdvae(*args, timeout=300):
    out = subprocess.run([*SDVAE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         errors="backslashreplace")
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    line = err[-1]
    assert line.startswith("sdvae ") and ": error: " in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.mark.slow
def test_encode_skips_and_names_each_bad_image_and_encodes_the_rest(corpus, tmp_path):
    out = sdvae("encode", corpus["images"], "--vae", corpus["vae"], "--out", tmp_path / "z",
                "--max-pixels", MAX_PIXELS)
    assert out.returncode == 0, out.stderr[-3000:]
    skipped = [line for line in out.stderr.splitlines() if line.startswith("skipped ")]
    for name in corpus["bad"] + [LONG_NAME]:
        assert any(os.fsencode(name).decode("utf-8", "backslashreplace") in line for line in skipped), name
    assert len(skipped) == len(corpus["bad"]) + 1  # the long name cannot be written; nothing else is skipped
    written = {p.stem for p in (tmp_path / "z").rglob("*.safetensors")}
    assert written == {Path(n).stem for n in corpus["good"]}  # and nothing for a bad input
    assert f"{len(written)} latents" in out.stdout and "huge.png: 400x300 is over max_pixels" in out.stderr


@pytest.mark.slow
def test_a_fifo_or_device_given_as_input_is_a_skip_never_a_hang(corpus, tmp_path):
    out = sdvae("encode", corpus["images"] / "pipe.png", "/dev/zero", corpus["photos"] / "a.png", "--vae",
                corpus["vae"], "--out", tmp_path / "z", timeout=120)
    assert out.returncode == 0 and "skipped" in out.stderr and "pipe.png" in out.stderr and "/dev/zero" in out.stderr
    assert (tmp_path / "z" / "a.safetensors").is_file() and not (tmp_path / "z" / "pipe.safetensors").exists()
    out = sdvae("encode", corpus["images"] / "pipe.png", "--vae", corpus["vae"], "--out", tmp_path / "y", timeout=120)
    assert out.returncode == 2 and "nothing to encode" in out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_decode_skips_and_names_each_bad_latent_file(corpus, tmp_path):
    out = sdvae("decode", corpus["latents"], "--vae", corpus["vae"], "--out", tmp_path / "png")
    assert out.returncode == 0, out.stderr[-3000:]
    skipped = [line for line in out.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(corpus["bad_latents"])
    for name in corpus["bad_latents"]:
        assert any(f"{name}.safetensors:" in line for line in skipped), name
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == sorted(
        Path(n).with_suffix(".png").name for n in corpus["good_latents"])


@pytest.mark.slow
def test_eval_stats_cache_and_train_count_the_bad_images_and_use_the_good(corpus, tmp_path):
    data, vae, bad = corpus["images"], corpus["vae"], set(corpus["bad"])
    out = sdvae("eval", "--vae", vae, "--data", data, "--out", tmp_path / "eval", "--resolution", "32", "--no-lpips",
                "--no-fid", "--max-pixels", MAX_PIXELS, "--full-size")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    skipped = {Path(s["path"]).name for s in metrics["skipped_files"]}
    assert bad <= skipped and skipped - bad == {"tiny.png"}  # 10x7: below SSIM's 11x11 window
    rows = (tmp_path / "eval" / "per_image.csv").read_text().splitlines()
    assert len(rows) == 1 + metrics["images"] and any("caf\\xe9" in row for row in rows)
    assert all((tmp_path / "eval" / f).is_file() for f in ("table.md", "grid.png", "psnr.png"))

    out = sdvae("stats", "--vae", vae, "--data", data, "--resolution", "32", "--max-pixels", MAX_PIXELS)
    assert out.returncode == 0 and f"({len(bad)} unreadable skipped)" in out.stdout, out.stdout + out.stderr[-2000:]

    out = sdvae("cache-latents", "--vae", vae, "--data", data, "--out", tmp_path / "cache", "--resolution", "32",
                "--num-workers", "0", "--max-pixels", MAX_PIXELS)
    assert out.returncode == 0, out.stderr[-3000:]
    skipped = [s for p in (tmp_path / "cache" / "done").glob("*.json") for s in json.loads(p.read_text())["skipped"]]
    assert {Path(s["key"]).name for s in skipped} == bad
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["images"] == len(corpus["good"]) + 1  # + the long name, which a cache does not write as a file

    out = sdvae("train", f"data={data}", f"output_dir={tmp_path / 'run'}", "max_steps=5", "resolution=32",
                "batch_size=4", "perceptual_weight=0", "num_workers=0", f"max_pixels={MAX_PIXELS}", "preview_images=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_files"] == len(bad)  # one epoch


VAE_COMMANDS = {
    "encode": lambda vae, data, out: ["encode", data, "--vae", vae, "--out", out],
    "decode": lambda vae, data, out: ["decode", data, "--vae", vae, "--out", out],
    "export": lambda vae, data, out: ["export", vae, "--out", out],
    "convert": lambda vae, data, out: ["convert", vae, out + ".safetensors"],
    "stats": lambda vae, data, out: ["stats", "--vae", vae, "--data", data, "--resolution", "32"],
    "eval": lambda vae, data, out: ["eval", "--vae", vae, "--data", data, "--out", out, "--no-lpips", "--no-fid"],
    "cache-latents": lambda vae, data, out: ["cache-latents", "--vae", vae, "--data", data, "--out", out,
                                             "--num-workers", "0"],
    "train": lambda vae, data, out: ["train", f"init_from={vae}", f"data={data}", f"output_dir={out}",
                                     "max_steps=1", "perceptual_weight=0", "num_workers=0"],
}


@pytest.mark.parametrize("command", VAE_COMMANDS)
def test_every_broken_vae_is_one_line_naming_it_in_every_command(corpus, tmp_path, capsys, command):
    for kind, vae in corpus["vaes"].items():
        out = tmp_path / kind
        assert main(VAE_COMMANDS[command](str(vae), str(corpus["photos"]), str(out))) == 2, kind
        line = one_line_error(capsys, vae.name)
        assert "Traceback" not in line and "huggingface.co" not in line, line
        written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".png")]
        assert not written, (kind, written)  # nothing that looks like a result


@pytest.mark.slow
def test_broken_vae_configs_name_the_key(corpus, capsys):
    keys = {"zero_scaling": "scaling_factor", "nan_scaling": "scaling_factor", "string_scaling": "scaling_factor",
            "bad_blocks": "block_out_channels", "negative_latents": "latent_channels",
            "unknown_block": "down_block_types", "groups_mismatch": "block_out_channels",
            "list_config": "JSON object", "bad_json": "line 1", "truncated_weights": "truncated",
            "truncated.safetensors": "truncated", "empty.safetensors": "not a safetensors file",
            "absurd_header.safetensors": "header", "garbage.safetensors": "safetensors"}
    for kind, needle in keys.items():
        assert main(["export", str(corpus["vaes"][kind]), "--out", "/nonexistent/x"]) == 2
        one_line_error(capsys, needle)
    out = sdvae("export", corpus["vaes"]["zero_scaling"], "--out", corpus["root"] / "never")  # and as a process
    assert out.returncode == 2 and "'scaling_factor'" in out.stderr and not (corpus["root"] / "never").exists()


@pytest.mark.parametrize("text, needle", [
    ("model: tiny\nbatch_size: [1\n", "c.yaml:3:1: not valid YAML"), ("~: 3\n", "config keys are names"), ("7: x\n", "config keys are names"),
    ("- a\n- b\n", "mapping"), ("batch_sise: 4\n", "unknown config key"), ("batch_size: four\n", "batch_size"),
    ("resolution: 63\n", "multiple of 8"), ("\x00\x01binary", "YAML")])
def test_bad_yaml_configs_are_one_line_with_where(tmp_path, capsys, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), f"output_dir={tmp_path / 'run'}"]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, needle", [
    (["stats", "--data", "{photos}", "--resolution", "63"], "multiple of 8"),
    (["eval", "--data", "{photos}", "--out", "{tmp}/e", "--grid-images", "-1"], "--grid-images"),
    (["encode", "{photos}", "--out", "{tmp}/z", "--batch-size", "0"], None),
    (["encode", "{photos}", "--out", "{tmp}/z", "--tile-size", "0"], "--tile-size"),
    (["encode", "{photos}", "--out", "{tmp}/z", "--max-pixels", "0"], "--max-pixels"),
    (["cache-latents", "--data", "{photos}", "--out", "{tmp}/c", "--resolution", "60"], "multiple of 8"),
    (["encode", "{tmp}/nothing-here", "--out", "{tmp}/z"], "no such file"),
])
def test_bad_values_are_one_line_before_any_work(corpus, tmp_path, capsys, argv, needle):
    argv = [a.format(photos=corpus["photos"], tmp=tmp_path) for a in argv] + ["--vae", str(corpus["vae"])]
    if needle is None:  # an option the command does not have: argparse's own usage error
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        return
    assert main(argv) == 2
    one_line_error(capsys, needle)
    assert not any(tmp_path.iterdir())


def test_debug_shows_the_traceback(corpus, capsys):
    with pytest.raises(ValueError, match="scaling_factor"):
        main(["export", str(corpus["vaes"]["zero_scaling"]), "--out", "/nonexistent/x", "--debug"])


def test_images_as_viewers_show_them(tmp_path):
    from sdvae.images import ImageTooLarge, open_image

    Image.fromarray(np.full((8, 8), 3.5, dtype=np.float32), "F").save(tmp_path / "over.tif")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F").save(tmp_path / "half.tif")
    assert np.asarray(open_image(tmp_path / "over.tif")).min() == 255  # clipped to white, not divided to black
    assert abs(int(np.asarray(open_image(tmp_path / "half.tif")).mean()) - 128) <= 1
    real_photo().save(tmp_path / "p.png")
    with pytest.raises(ImageTooLarge, match="max_pixels"):
        open_image(tmp_path / "p.png", max_pixels=100)


def test_the_python_api_says_what_it_expected(vae_dir):
    import sdvae

    codec = sdvae.load_vae(vae_dir, dtype="fp32")
    assert sdvae.load_vae(vae_dir, dtype="bf16").dtype == torch.bfloat16
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    z = codec.encode(image)
    cases = [
        (lambda: sdvae.load_vae(vae_dir, dtype="fp64"), ValueError, "dtype"),
        (lambda: sdvae.load_vae(vae_dir, device="fp16"), ValueError, "device"),
        (lambda: sdvae.load_vae(vae_dir, tile_size=0), ValueError, "tile_size"),
        (lambda: sdvae.load_vae(vae_dir, max_memory=-1), ValueError, "max_memory"),
        (lambda: codec.encode((image * 127.5 + 127.5).to(torch.uint8)), TypeError, "x / 127.5 - 1"),
        (lambda: codec.encode(image * 127.5 + 127.5), ValueError, "[-1, 1]"),
        (lambda: codec.encode([]), ValueError, "no images"),
        (lambda: codec.encode(image, generator="x"), TypeError, "torch.Generator"),
        (lambda: codec.encode(image, tile_size=0), ValueError, "tile_size"),
        (lambda: codec.decode([z]), TypeError, "latent tensor"),
        (lambda: codec.decode(z, size=(-5, -5)), ValueError, "size"),
        (lambda: codec.decode(z[:, :3]), ValueError, "(B, 4, h, w)"),
        (lambda: codec.decode(z * math.nan), ValueError, "NaN"),
        (lambda: codec.encode("a.png"), TypeError, "PIL images"),
    ]
    for call, error, needle in cases:
        with pytest.raises(error) as info:
            call()
        assert needle in str(info.value), (needle, str(info.value))
