"""The command line as a user meets it: mistakes end in one line naming the bad file or flag, exit code 2, and
no output is silently lost."""
import json
import logging

import pytest
from PIL import Image

from sdvae.cli import main
from sdvae.images import load_photo


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("astronaut", (37, 29)), ("coffee", (64, 48))):  # odd sizes on purpose
        Image.fromarray(load_photo(name)).resize(size).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def not_images(tmp_path):
    folder = tmp_path / "not-images"
    folder.mkdir()
    (folder / "broken.png").write_text("not a png")
    return folder


def error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_output_that_is_a_file_is_a_one_line_error(vae_dir, images, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["encode", str(images), "--vae", str(vae_dir), "--out", str(blocker)]) == 2
    assert str(blocker) in error(capsys)
    assert main(["cache-latents", "--vae", str(vae_dir), "--data", str(images), "--out", str(blocker),
                 "--resolution", "64", "--num-workers", "0"]) == 2
    assert str(blocker) in error(capsys)


def test_convert_never_reports_an_output_it_did_not_write(vae_dir, tmp_path, capsys):
    single = tmp_path / "vae.safetensors"
    assert main(["convert", str(vae_dir), str(single)]) == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["convert", str(single), str(blocker)]) == 2  # diffusers folder over a file: nothing was written
    assert str(blocker) in error(capsys)
    assert main(["convert", str(vae_dir), str(tmp_path)]) == 2  # single file over a folder
    assert str(tmp_path) in error(capsys)
    # an LDM file converts to a diffusers folder: a folder called x.safetensors is not what the user meant
    assert main(["convert", str(single), str(tmp_path / "again.safetensors")]) == 2
    assert "export" in error(capsys) and not (tmp_path / "again.safetensors").exists()


def test_export_fp16_says_nothing_about_fp32_modules(vae_dir, tmp_path):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' loggers do not reach the root logger
    try:
        assert main(["export", str(vae_dir), "--out", str(tmp_path / "half"), "--dtype", "fp16", "--no-fp16-check"]) == 0
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [m for m in messages if "kept in float32" in m]  # diffusers' warning about its own .to(), not ours


def test_encode_missing_input_is_an_error_before_anything_runs(vae_dir, images, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main(["encode", str(images), str(missing), "--vae", str(vae_dir), "--out", str(tmp_path / "z")]) == 2
    assert str(missing) in error(capsys) and not (tmp_path / "z").exists()


def test_encode_of_only_unreadable_files_fails(vae_dir, not_images, tmp_path, capsys):
    assert main(["encode", str(not_images), "--vae", str(vae_dir), "--out", str(tmp_path / "z")]) == 2
    assert "broken.png" in error(capsys)


def test_cache_of_only_unreadable_files_fails(vae_dir, not_images, tmp_path, capsys):
    """README: 'no images at all is an error'."""
    assert main(["cache-latents", "--vae", str(vae_dir), "--data", str(not_images), "--out", str(tmp_path / "c"),
                 "--resolution", "64", "--num-workers", "0"]) == 2
    assert "broken.png" in error(capsys)


@pytest.mark.slow
def test_decode_skips_and_names_what_is_not_a_latent_file(vae_dir, images, tmp_path, capsys):
    latents, out = tmp_path / "latents", tmp_path / "decoded"
    assert main(["encode", str(images), "--vae", str(vae_dir), "--out", str(latents)]) == 0
    picture = tmp_path / "picture.safetensors"
    picture.write_bytes((images / "astronaut.png").read_bytes())
    for wrong in (picture, vae_dir / "diffusion_pytorch_model.safetensors"):
        assert main(["decode", str(latents), str(wrong), "--vae", str(vae_dir), "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert f"skipped {wrong}" in err and "Traceback" not in err
    assert Image.open(out / "astronaut.png").size == (37, 29) and Image.open(out / "coffee.png").size == (64, 48)
    assert main(["decode", str(latents), str(tmp_path / "nope"), "--vae", str(vae_dir), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in error(capsys) and not (tmp_path / "o").exists()  # a missing input: before anything is written


def test_sizes_below_one_are_flag_errors(vae_dir, images, tmp_path, capsys):
    assert main(["encode", str(images), "--vae", str(vae_dir), "--out", str(tmp_path / "z"), "--tiled",
                 "--tile-size", "0"]) == 2
    assert "--tile-size" in error(capsys)
    assert main(["stats", "--vae", str(vae_dir), "--data", str(images), "--batch-size", "0"]) == 2
    assert "--batch-size" in error(capsys)


def test_stats_write_without_config_fails_before_measuring(vae_dir, images, tmp_path, capsys, monkeypatch):
    single = tmp_path / "vae.safetensors"
    assert main(["convert", str(vae_dir), str(single)]) == 0
    monkeypatch.setattr("sdvae.latents.latent_statistics", lambda *a, **k: pytest.fail("measured first"))
    assert main(["stats", "--vae", str(single), "--data", str(images), "--write"]) == 2
    assert "config.json" in error(capsys)
    assert main(["stats", "--vae", str(vae_dir), "--data", str(images), "--shift"]) == 2  # --shift does nothing alone
    assert "--write" in error(capsys)


def test_vae_run_folder_before_its_export_says_so(images, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint-250").mkdir(parents=True)
    (run / "config.yaml").write_text("model: tiny\n")
    assert main(["encode", str(images), "--vae", str(run), "--out", str(tmp_path / "z")]) == 2
    err = error(capsys)
    assert str(run) in err and "vae/" in err and "init_from" not in err


@pytest.mark.slow
def test_new_run_in_a_used_run_folder_sets_the_old_checkpoints_aside(images, tmp_path, capsys):
    """Else its checkpoints would be pruned in favour of the old run's later ones, and --resume latest pick those."""
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"step": 4}))
    assert main(["train", f"data={images}", f"output_dir={run}", "max_steps=2", "resolution=32", "checkpoint_every=1",
                 "checkpoints_total_limit=1", "perceptual_weight=0", "num_workers=0"]) == 0
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-2", "superseded-checkpoint-4"]
    assert "superseded-checkpoint-4" in capsys.readouterr().out


def test_eval_output_that_is_a_file_fails_before_scoring(vae_dir, images, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr("sdvae.codec.load_vae", lambda *a, **k: pytest.fail("loaded the VAE first"))
    assert main(["eval", "--vae", str(vae_dir), "--data", str(images), "--out", str(blocker), "--no-lpips",
                 "--no-fid", "--resolution", "32"]) == 2
    assert str(blocker) in error(capsys)
