"""What every command does with what it finds: existing outputs (never replaced unless sdvae wrote them, or
--overwrite), VAEs with non-finite weights (refused where they are loaded), folders whose names are not UTF-8,
tensors of the wrong rank, and formats a client cannot build."""
import io
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file

from sdvae.cli import main
from sdvae.files import OUTPUT_RECORD, file_is_ours
from sdvae.models import build_vae
from sdvae.weights import is_finite
from sdvae.sources import load_pretrained_vae
from sdvae.progress import advance

NOT_UTF8 = os.fsdecode(b"caf\xe9")


def user_folder(path: Path) -> Path:
    """A folder the user owns: a clone of a Hub repo."""
    (path / ".git").mkdir(parents=True)
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "README.md").write_text("my model card\n")
    return path


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.split(": ")[1] == "error", err
    assert all(w in err for w in words), err
    return err


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["export", "{vae}", "--no-fp16-check", "--out", "{out}"],
    ["export", "{vae}", "--format", "onnx", "--out", "{out}"],
    ["convert", "{single}", "{out}"],
    ["publish", "{vae}", "--repo-id", "me/x", "--dry-run", "--out", "{out}"],
])
def test_a_folder_sdvae_did_not_write_is_never_replaced(tmp_path, vae_dir, capsys, argv):
    single = tmp_path / "v.safetensors"
    assert main(["export", str(vae_dir), "--format", "single-file", "--no-fp16-check", "--out", str(single)]) == 0
    out = user_folder(tmp_path / "clone")
    before = snapshot(out)
    fill = dict(vae=str(vae_dir), single=str(single), out=str(out))
    argv = [a.format(**fill) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    one_error(capsys, str(out), "--overwrite")
    assert snapshot(out) == before and not any(p.name.startswith(".clone") for p in tmp_path.iterdir())
    assert main(argv + ["--overwrite"]) == 0  # asked for: replaced whole
    assert not (out / ".git").exists() and (out / OUTPUT_RECORD).is_file()
    assert main(argv) == 0  # what sdvae wrote itself is replaced without asking


def test_a_file_sdvae_did_not_write_is_never_replaced(tmp_path, vae_dir, capsys):
    mine = tmp_path / "mine.safetensors"
    save_file({"w": torch.ones(2)}, mine)
    for argv in (["export", str(vae_dir), "--format", "single-file", "--no-fp16-check", "--out", str(mine)],
                 ["convert", str(vae_dir), str(mine)]):
        assert main(argv) == 2
        one_error(capsys, str(mine), "--overwrite")
        assert set(load_file(mine)) == {"w"}
    assert main(["convert", str(vae_dir), str(mine), "--overwrite"]) == 0
    assert file_is_ours(mine) and "encoder.conv_in.weight" in load_file(mine)
    assert main(["convert", str(vae_dir), str(mine)]) == 0  # ours now


def test_a_file_added_to_an_exported_folder_keeps_it_from_being_replaced(tmp_path, vae_dir, capsys):
    out = tmp_path / "export"
    assert main(["export", str(vae_dir), "--no-fp16-check", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(vae_dir), "--no-fp16-check", "--out", str(out)]) == 2
    one_error(capsys, "would be replaced whole")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_encode_and_decode_never_replace_files_they_did_not_write(tmp_path, vae_dir, photos, capsys):
    latents, decoded = tmp_path / "latents", tmp_path / "decoded"
    assert main(["encode", str(photos), "--vae", str(vae_dir), "--out", str(latents)]) == 0
    assert main(["decode", str(latents), "--vae", str(vae_dir), "--out", str(decoded)]) == 0
    assert main(["decode", str(latents), "--vae", str(vae_dir), "--out", str(decoded)]) == 0  # ours: replaced
    # decoding into the photos' own folder would replace the user's PNGs
    before = snapshot(photos)
    capsys.readouterr()
    assert main(["decode", str(latents), "--vae", str(vae_dir), "--out", str(photos)]) == 2
    one_error(capsys, str(photos), "--overwrite")
    assert snapshot(photos) == before
    # a file the user put into a folder of ours, under a name the run would write
    Image.new("RGB", (8, 8)).save(decoded / "astronaut.png")
    assert main(["decode", str(latents), "--vae", str(vae_dir), "--out", str(decoded)]) == 2
    one_error(capsys, "astronaut.png", "--overwrite")
    assert Image.open(decoded / "astronaut.png").size == (8, 8)
    assert main(["decode", str(latents), "--vae", str(vae_dir), "--out", str(decoded), "--overwrite"]) == 0
    assert Image.open(decoded / "astronaut.png").size != (8, 8)


def test_train_never_writes_into_a_folder_it_did_not_make(tmp_path, photos, capsys):
    out = user_folder(tmp_path / "pipeline")
    (out / "vae").mkdir()
    (out / "vae" / "config.json").write_text("{}")
    before = snapshot(out)
    assert main(["train", f"data={photos}", f"output_dir={out}", "max_steps=1", "resolution=32",
                 "perceptual_weight=0"]) == 2
    one_error(capsys, str(out), "output_dir")
    assert snapshot(out) == before and not (out / ".sdvae.lock").exists()


def nan_vae(tmp_path, vae_dir) -> Path:
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        vae.encoder.mid_block.resnets[0].conv1.bias[3] = float("inf")
    vae.save_pretrained(tmp_path / "nan-vae")
    return tmp_path / "nan-vae"


def test_every_command_refuses_a_vae_with_non_finite_weights(tmp_path, vae_dir, photos, capsys):
    bad = str(nan_vae(tmp_path, vae_dir))
    assert main(["encode", str(photos), "--vae", str(vae_dir), "--out", str(tmp_path / "z")]) == 0
    commands = [
        ["encode", str(photos), "--vae", bad, "--out", str(tmp_path / "e")],
        ["decode", str(tmp_path / "z"), "--vae", bad, "--out", str(tmp_path / "d")],
        ["stats", "--vae", bad, "--data", str(photos), "--resolution", "32"],
        ["eval", "--vae", bad, "--data", str(photos), "--out", str(tmp_path / "ev"), "--no-lpips", "--no-fid",
         "--resolution", "32"],
        ["cache-latents", "--vae", bad, "--data", str(photos), "--out", str(tmp_path / "c"), "--resolution", "32"],
        ["probe", "--vae", bad, "--data", str(photos), "--out", str(tmp_path / "p"), "--resolution", "32",
         "--steps", "2", "--no-fid", "--denoiser", "tiny"],
        ["export", bad, "--out", str(tmp_path / "x")],
        ["convert", bad, str(tmp_path / "x.safetensors")],
        ["publish", bad, "--repo-id", "me/x", "--dry-run", "--out", str(tmp_path / "pub")],
        ["train", f"data={photos}", f"init_from={bad}", f"output_dir={tmp_path / 'run'}", "max_steps=1",
         "resolution=32", "perceptual_weight=0"],
    ]
    capsys.readouterr()
    for argv in commands:
        assert main(argv) == 2, argv
        one_error(capsys, "non-finite", "encoder.mid_block.resnets.0.conv1.bias")
    for name in ("e", "d", "x", "x.safetensors", "pub"):
        assert not any((tmp_path / name).glob("*.safetensors")) and not (tmp_path / name).is_file()


def test_the_finiteness_check_sees_every_kind_of_bad_value():
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(1000)
        t[517] = bad
        assert not is_finite(t) and not is_finite(t.half()) and not is_finite(t.bfloat16())
    assert is_finite(torch.full((10,), 3e38))  # a sum that overflows is checked element by element
    assert is_finite(torch.zeros(0)) and is_finite(torch.randn(100))


@pytest.mark.slow
def test_a_vae_under_a_path_that_is_not_utf8_works_in_every_command(tmp_path, vae_dir, photos, capsys):
    folder = tmp_path / NOT_UTF8
    build_vae("tiny").save_pretrained(folder / "vae")
    single, out = folder / "v.safetensors", folder / "out"
    assert main(["export", str(folder / "vae"), "--format", "single-file", "--no-fp16-check", "--out", str(single)]) == 0
    assert main(["export", str(single), "--no-fp16-check", "--out", str(out)]) == 0
    assert main(["encode", str(photos), "--vae", str(single), "--out", str(folder / "z")]) == 0
    assert main(["decode", str(folder / "z"), "--vae", str(out), "--out", str(folder / "d")]) == 0
    assert len(list((folder / "d").glob("*.png"))) == len(list(photos.glob("*.png")))
    a, b = load_pretrained_vae(str(folder / "vae")), load_pretrained_vae(str(out))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_tensors_of_the_wrong_rank_are_listed_by_name(tmp_path, vae_dir, capsys):
    single = tmp_path / "v.safetensors"
    assert main(["export", str(vae_dir), "--format", "single-file", "--no-fp16-check", "--out", str(single)]) == 0
    state = load_file(single)
    state["encoder.conv_in.weight"] = torch.zeros(32)  # 1-D where a convolution belongs
    state["decoder.mid.block_1.norm1.weight"] = torch.zeros(4, 4)
    save_file(state, tmp_path / "bad.safetensors")
    capsys.readouterr()
    for argv in (["convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "o")],
                 ["export", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o2")]):
        assert main(argv) == 2
        one_error(capsys, "encoder.conv_in.weight (32,)", "decoder.mid.block_1.norm1.weight (4, 4)")


def test_formats_a_client_cannot_build_are_refused_before_any_work(tmp_path, vae_dir, capsys):
    from sdvae.models import build_student

    teacher = AutoencoderKL.from_pretrained(vae_dir)
    for preset in ("taesd", "taesd-16"):
        build_student(preset, teacher).save_pretrained(tmp_path / preset)
    # a student as a single file: refused at once, without the fp16 check
    assert main(["export", str(tmp_path / "taesd"), "--format", "single-file", "--out", str(tmp_path / "s.safetensors")]) == 2
    one_error(capsys, "tiny student")
    # taesd-16's 16-channel blocks: no TAESD client builds them
    assert main(["export", str(tmp_path / "taesd-16"), "--format", "taesd", "--out", str(tmp_path / "t16")]) == 2
    one_error(capsys, "64 channels")
    assert main(["export", str(tmp_path / "taesd"), "--format", "taesd", "--out", str(tmp_path / "t")]) == 0
    # a tiny KL VAE as a single file: written, with one line saying the UIs cannot build it
    assert main(["export", str(vae_dir), "--format", "single-file", "--no-fp16-check", "--out",
                 str(tmp_path / "k.safetensors")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdvae export: warning: ") and "ComfyUI" in err[0]


def test_warnings_are_one_line_each(tmp_path, vae_dir, capsys):
    from sdvae import cli

    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = cli.one_line_warnings("encode")
        warnings.warn("first part\n  second part")
        warnings.showwarning = shown
    assert capsys.readouterr().err == "sdvae encode: warning: first part second part\n"


def test_a_run_stopped_by_a_signal_shows_how_far_it_got():
    from types import SimpleNamespace

    from tqdm import tqdm

    cfg, state = SimpleNamespace(max_minutes=0, max_steps=100), SimpleNamespace(train_seconds=0.0)
    with tqdm(total=100, file=io.StringIO()) as bar:
        for _ in range(36):
            advance(bar, cfg, state, 0.0, stop=False)
        advance(bar, cfg, state, 0.0, stop=True, signum=2)
        assert (bar.n, bar.total) == (37, 100)
    with tqdm(total=100, file=io.StringIO()) as bar:
        advance(bar, cfg, state, 0.0, stop=True)  # a run that ends on its own: the bar ends where it stopped
        assert (bar.n, bar.total) == (1, 1)


def test_encode_names_an_empty_image(vae_dir):
    import numpy as np

    from sdvae.codec import load_vae

    codec = load_vae(str(vae_dir))
    for empty in (Image.new("RGB", (0, 0)), Image.new("RGB", (5, 0)), np.zeros((0, 4, 3), np.uint8),
                  torch.zeros(3, 0, 8), torch.zeros(0, 3, 8, 8), [Image.new("RGB", (3, 0))]):
        with pytest.raises(ValueError, match="empty image|H, W >= 1"):
            codec.encode(empty)
    assert codec.encode(Image.new("RGB", (1, 1))).shape == (1, 4, 1, 1)  # one pixel is an image


def test_files_get_the_mode_open_gives_under_the_umask(tmp_path, vae_dir, photos):
    old = os.umask(0o027)
    try:
        assert main(["export", str(vae_dir), "--no-fp16-check", "--out", str(tmp_path / "vae")]) == 0
        assert main(["export", str(vae_dir), "--format", "single-file", "--no-fp16-check", "--out",
                     str(tmp_path / "v.safetensors")]) == 0
        assert main(["encode", str(photos), "--vae", str(vae_dir), "--out", str(tmp_path / "z")]) == 0
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "photos" not in p.parts]
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors") in written and len(written) > 5
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o640)}  # 0o666 & ~0o027: never 0600


def test_a_gpu_preset_on_this_cpu_is_told_and_capped(tmp_path, photos, caplog, monkeypatch):
    from types import SimpleNamespace

    from sdvae import train as training
    from sdvae.config import load_config

    cfg = load_config(None, {"num_workers": "64", "data": str(photos)})
    main_process = SimpleNamespace(is_main_process=True, device=torch.device("cpu"))
    with caplog.at_level("WARNING", logger="sdvae"):
        assert training.loader_workers(cfg, main_process) == (os.cpu_count() or 1)
    assert "num_workers=64 capped" in caplog.text
    monkeypatch.setattr(training, "cpu_has_fast_16bit", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="mixed_precision=bf16 on this CPU.*slower than fp32"):
        training.make_accelerator(load_config(None, {"mixed_precision": "bf16"}), tmp_path / "run")


def test_missing_lpips_weights_stop_a_run_before_anything_is_built(tmp_path, photos, capsys):
    started = time.time()
    assert main(["train", f"data={photos}", f"output_dir={tmp_path / 'run'}", "perceptual_weight=1",
                 f"lpips_vgg_weights={tmp_path / 'nowhere' / 'vgg16-397923af.pth'}"]) == 2
    err = one_error(capsys, "nowhere", "perceptual_weight=0", "fetch-weights")
    left = {p.name for p in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert time.time() - started < 20 and left <= {".sdvae.lock"}, (err, left)  # no model, no loader, no files


def test_fetch_weights_keeps_what_the_cache_holds(tmp_path, capsys, monkeypatch):
    from sdvae.downloads import LPIPS_TRUNKS
    from sdvae.downloads import FID_WEIGHTS_URL

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for url in (*LPIPS_TRUNKS.values(), FID_WEIGHTS_URL):
        (cache / Path(url).name).write_bytes(b"weights")
    assert main(["fetch-weights"]) == 0
    out = capsys.readouterr().out
    assert out.count(str(cache)) == 3 and all(p.read_bytes() == b"weights" for p in cache.iterdir())


def test_the_demo_says_how_far_it_got_and_the_bar_total_holds_still(monkeypatch):
    from sdvae import train as training

    from types import SimpleNamespace

    from tqdm import tqdm

    from sdvae.cli import demo_pace

    assert "train longer" in demo_pace(20, 3.0).lower() and "max_minutes=" in demo_pace(20, 3.0)
    assert "max_minutes" not in demo_pace(400, 3.0) and "400 steps" in demo_pace(400, 3.0)
    cfg, state = SimpleNamespace(max_minutes=3.0, max_steps=5000), SimpleNamespace(train_seconds=0.0)
    totals, clock = [], [0.0]
    monkeypatch.setattr(training.time, "time", lambda: clock[0])
    with tqdm(total=5000, file=io.StringIO()) as bar:
        for k in range(1, 200):  # about 2 steps/s, each step 5% faster or slower than the last: a busy machine
            clock[0] = 0.5 * k * (1 + 0.05 * (-1) ** k)
            state.train_seconds = clock[0]
            advance(bar, cfg, state, 0.0, stop=False)
            totals.append(bar.total)
    assert len(set(totals[5:])) <= 2 and abs(totals[-1] - 360) < 40, totals  # not a new total every step


def test_help_describes_every_command_and_argument_without_importing_torch():
    import subprocess
    import sys

    from sdvae.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert sub.description, f"sdvae {name} has no description"
        for action in sub._actions:
            if action.dest not in ("help", "debug", "run"):
                assert action.help, f"sdvae {name}: {action.dest} has no help"
    script = "import sys, sdvae.cli; sdvae.cli.build_parser().format_help(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout.strip() == "False"
