import json
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from sdvae.config import load_config
from sdvae.checkpoints import find_checkpoint
from sdvae.train import train
from tests.test_data import write_real_world_files


def config(tmp_path, data, **overrides):
    values = dict(model="tiny", data=str(data), resolution=32, batch_size=4, max_steps=6, learning_rate=1e-3,
                  adam_beta1=0.9, adam_beta2=0.99, perceptual_weight=0.0, num_workers=0, log_every=2,
                  sample_every=3, checkpoint_every=3, output_dir=str(tmp_path / "run"))
    values.update(overrides)
    return load_config(overrides=values)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """VGG16 features in torchvision's file format, random init (no download possible here)."""
    import torchvision

    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()}, path)
    return path


@pytest.mark.slow
def test_training_on_real_photos_lowers_the_loss_and_writes_the_run_folder(tmp_path, photos, vgg_file):
    cfg = config(tmp_path, photos, max_steps=40, log_every=5, perceptual_weight=0.1,
                 lpips_vgg_weights=str(vgg_file), val_data=str(photos), sample_every=15, checkpoint_every=10)
    metrics = train(cfg)
    run = tmp_path / "run"
    assert metrics["last_logged"]["rec_loss"] < metrics["first_logged"]["rec_loss"]
    assert metrics["validation"]["psnr_mean"] > metrics["validation_at_start"]["psnr_mean"] + 1.5, metrics
    assert metrics["perceptual_loss"] and "perceptual_loss" in metrics["last_logged"]
    assert metrics["steps"] == 40 and metrics["images_per_sec"] > 0
    assert json.loads((run / "metrics.json").read_text())["validation"]["psnr_mean"] > 0
    assert load_config(run / "config.yaml") == cfg
    assert (run / "vae" / "config.json").is_file() and (run / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000015.png", "step-0000030.png", "step-0000040.png"]
    assert (run / "reconstructions.png").is_file()
    assert list((run / "logs").rglob("events.out.tfevents*"))


def test_export_round_trip_reproduces_the_trained_model(tmp_path, photos):
    train(config(tmp_path, photos))
    run = tmp_path / "run"
    exported = AutoencoderKL.from_pretrained(run / "vae").eval()
    trained = AutoencoderKL.from_config(exported.config).eval()
    weights = load_file(run / "checkpoint-6" / "model.safetensors")
    trained.load_state_dict({k.removeprefix("vae."): v for k, v in weights.items()})
    x = torch.rand(2, 3, 48, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(exported(x, sample_posterior=False).sample, trained(x, sample_posterior=False).sample)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_continues_exactly(tmp_path, photos, schedule):
    """Run 6 steps straight; separately resume from its step-3 checkpoint: the weights are identical."""
    straight = train(config(tmp_path, photos, max_steps=6, lr_schedule=schedule))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-3", resumed_dir / "checkpoint-3")
    state = json.loads((resumed_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3
    resumed = train(config(tmp_path, photos, max_steps=6, output_dir=str(resumed_dir), resume="latest",
                           lr_schedule=schedule))
    assert resumed["steps"] == straight["steps"] == 6
    a = load_file(tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(tmp_path / "run" / "checkpoint-6" / "optimizer.bin", weights_only=True)
    opt_b = torch.load(resumed_dir / "checkpoint-6" / "optimizer.bin", weights_only=True)
    assert opt_a["state"][0]["step"] == opt_b["state"][0]["step"] == 6
    assert all(torch.equal(opt_a["state"][i]["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"]) for i in opt_a["state"])


@pytest.mark.slow
def test_half_written_checkpoints_are_never_resumed_and_old_ones_are_pruned(tmp_path, photos):
    train(config(tmp_path, photos, max_steps=9, checkpoints_total_limit=2))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-9"]
    (run / ".checkpoint-12.tmp").mkdir()  # what a kill during save leaves behind
    (run / "checkpoint-15").mkdir()  # a folder without trainer_state.json is not a checkpoint
    assert find_checkpoint(run, "latest") == run / "checkpoint-9"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path, "latest")


@pytest.mark.slow
def test_bad_files_are_skipped_and_counted(tmp_path, photos):
    good, bad = write_real_world_files(photos / "odd")
    metrics = train(config(tmp_path, photos, max_steps=8))
    assert metrics["steps"] == 8
    assert metrics["skipped_files"] == len(bad)


def test_empty_data_fails_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        train(config(tmp_path, tmp_path / "empty"))
    assert not (tmp_path / "run" / "checkpoint-3").exists()


@pytest.mark.slow
def test_cli_help_and_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sdvae", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout
    out = subprocess.run([sys.executable, "-m", "sdvae", "train", "learning_rat=1"], capture_output=True, text=True)
    assert out.returncode == 2 and "learning_rat" in out.stderr and "Valid keys" in out.stderr
    out = subprocess.run([sys.executable, "-m", "sdvae", "train", f"data={tmp_path / 'nowhere'}",
                          f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert out.returncode == 2 and "not found" in out.stderr


def test_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path, photos):
    metrics = train(config(tmp_path, photos, max_steps=2, batch_size=2, mixed_precision="bf16"))
    assert metrics["mixed_precision"] == "bf16" and metrics["steps"] == 2
    weights = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_warmup_starts_at_its_first_rate(tmp_path, photos, monkeypatch):
    """Step s (from 0) trains at learning_rate * (s + 1) / lr_warmup_steps: the first step too, not at full rate."""
    rates, adam_step = [], torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    train(config(tmp_path, photos, max_steps=4, lr_warmup_steps=4, learning_rate=1e-3, checkpoint_every=100))
    assert rates == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])


def test_logged_means_count_only_the_steps_that_have_the_value(tmp_path, photos, monkeypatch):
    """grad_norm exists once per optimizer step, not per accumulated micro-batch: its logged mean is not diluted."""
    monkeypatch.setattr("accelerate.Accelerator.clip_grad_norm_", lambda self, params, max_norm: torch.tensor(3.0))
    metrics = train(config(tmp_path, photos, max_steps=2, gradient_accumulation_steps=2, log_every=1,
                           checkpoint_every=100))
    assert metrics["first_logged"]["grad_norm"] == metrics["last_logged"]["grad_norm"] == 3.0


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, photos):
    """With keep=1, pruning used to delete the new checkpoint-6 and keep the old timeline's checkpoint-9;
    `resume=latest` after a kill would then have gone back to the old timeline."""
    train(config(tmp_path, photos, max_steps=9, checkpoints_total_limit=0))
    run = tmp_path / "run"
    resumed = train(config(tmp_path, photos, max_steps=6, checkpoints_total_limit=1, resume=str(run / "checkpoint-3"),
                           ema_decay=0.9))  # EMA turned on at resume: the checkpoint has none
    assert resumed["steps"] == 6
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6"]
    assert sorted(p.name for p in run.glob("superseded-*")) == ["superseded-checkpoint-6", "superseded-checkpoint-9"]
    assert find_checkpoint(run, "latest") == run / "checkpoint-6"
    assert (run / "checkpoint-6" / "ema.safetensors").is_file()


def test_scale_lr_scales_the_discriminator_rate_too(tmp_path, photos):
    """LDM multiplies one base rate for both optimisers; an explicit disc_learning_rate is a base rate as well."""
    train(config(tmp_path, photos, max_steps=1, batch_size=2, checkpoint_every=1, scale_lr=True, learning_rate=1e-5,
                 disc_weight=0.5, disc_start=0, disc_learning_rate=3e-5))
    checkpoint = tmp_path / "run" / "checkpoint-1"
    rates = [torch.load(checkpoint / name, weights_only=True)["param_groups"][0]["lr"]
             for name in ("optimizer.bin", "optimizer_1.bin")]
    assert rates == pytest.approx([2e-5, 6e-5])


def test_data_where_no_image_can_be_read_is_an_error_not_an_endless_loop(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="none of the 3 images"):
        train(config(tmp_path, folder, max_steps=2, batch_size=2))


def test_progress_total_is_the_step_max_minutes_will_stop_at():
    from sdvae.config import TrainConfig
    from sdvae.progress import steps_in_time

    # 10 steps in 6 s: 54 s left of a 1-minute run make 90 more
    assert steps_in_time(TrainConfig(max_minutes=1, max_steps=1000), 10, 10, 6.0, 6.0) == 100
    assert steps_in_time(TrainConfig(max_minutes=1, max_steps=50), 10, 10, 6.0, 6.0) == 50  # max_steps first
    # resumed after 30 s of an earlier session: 24 s are left at this session's rate
    assert steps_in_time(TrainConfig(max_minutes=1, max_steps=1000), 60, 10, 6.0, 36.0) == 100
    # past the time limit: the run stops at the current step
    assert steps_in_time(TrainConfig(max_minutes=1, max_steps=1000), 10, 10, 120.0, 120.0) == 10


def test_cosine_schedule_warms_up_then_falls_to_its_floor_by_steps_or_by_time():
    import dataclasses
    import math
    from types import SimpleNamespace

    from sdvae.checkpoints import TrainState
    from sdvae.config import TrainConfig
    from sdvae.train import learning_rate, run_progress

    one = SimpleNamespace(num_processes=1)
    cfg = TrainConfig(learning_rate=1e-3, lr_warmup_steps=10, lr_schedule="cosine", lr_min_ratio=0.1, max_steps=100)
    assert learning_rate(cfg, one, 0, 0.0) == pytest.approx(1e-4)  # the warm-up's first
    assert learning_rate(cfg, one, 50, 0.5) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert learning_rate(cfg, one, 99, 1.0) == pytest.approx(1e-4)  # the floor at the end
    rates = [learning_rate(cfg, one, s, run_progress(cfg, TrainState(step=s))) for s in range(10, 101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert learning_rate(dataclasses.replace(cfg, lr_schedule="constant"), one, 50, 0.5) == pytest.approx(1e-3)
    # a time limit that comes first sets the progress; without one, the steps alone do
    timed = dataclasses.replace(cfg, max_minutes=1.0)
    assert run_progress(timed, TrainState(step=10, train_seconds=30)) == pytest.approx(0.5)
    assert run_progress(timed, TrainState(step=80, train_seconds=30)) == pytest.approx(0.8)
    assert run_progress(timed, TrainState(step=10, train_seconds=600)) == 1.0
    assert run_progress(cfg, TrainState(step=10, train_seconds=600)) == pytest.approx(0.1)


def test_max_minutes_counts_every_session_of_a_resumed_run(tmp_path, photos, capsys):
    run = tmp_path / "run"
    first = train(config(tmp_path, photos, max_steps=100, max_minutes=1e-4))  # 6 ms: it stops after one step
    assert first["steps"] == 1
    trained = json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())["train_seconds"]
    assert trained >= 0.006
    capsys.readouterr()
    assert train(config(tmp_path, photos, max_steps=100, max_minutes=1e-4, resume="latest")) == {}
    assert "raise max_minutes" in capsys.readouterr().out  # its time is spent: nothing is trained or written
    more = train(config(tmp_path, photos, max_steps=3, max_minutes=10, resume="latest"))
    assert more["steps"] == 3
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["train_seconds"] > trained


@pytest.mark.slow
def test_channels_last_computes_what_the_default_layout_computes(tmp_path, photos):
    runs = {layout: train(config(tmp_path, photos, max_steps=2, log_every=1, channels_last=layout,
                                 output_dir=str(tmp_path / str(layout)))) for layout in (False, True)}
    assert runs[True]["first_logged"]["loss"] == pytest.approx(runs[False]["first_logged"]["loss"], rel=1e-5)
    exported = AutoencoderKL.from_pretrained(tmp_path / "True" / "vae")
    assert all(p.is_contiguous() for p in exported.parameters())  # loads as any diffusers VAE


def test_reconstructions_png_shows_held_out_images_large_with_their_error():
    import numpy as np

    from sdvae.pictures import error_grid

    x = torch.zeros(2, 3, 64, 64)
    y = x.clone()
    y[1, :, :32] = 0.5  # the second image is wrong in its top half
    grid = np.asarray(error_grid(x, y, min_side=256)).astype(int)
    assert grid.shape == (2 * 256 + 4, 3 * 256 + 8, 3)  # 4x enlarged, three panels a row, one row an image
    error = grid[:, 2 * 256 + 8:]
    assert np.ptp(error[:256].reshape(-1, 3), axis=0).max() == 0  # no error: one flat colour
    top, bottom = error[260:260 + 128].sum(-1), error[260 + 128:].sum(-1)
    assert top.min() > bottom.max()  # the wrong half is the bright one


def test_posterior_logvar_init_sets_where_the_posterior_noise_starts():
    from sdvae.config import TrainConfig
    from sdvae.models import trainable_vae

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        quiet = trainable_vae(TrainConfig(model="tiny", posterior_logvar_init=-6.0)).encode(x).latent_dist
        default = trainable_vae(TrainConfig(model="tiny")).encode(x).latent_dist
    assert torch.allclose(quiet.logvar, torch.full_like(quiet.logvar, -6.0))
    assert default.logvar.abs().mean() < 2 and default.logvar.std() > 0  # diffusers' init: sigma about 1
