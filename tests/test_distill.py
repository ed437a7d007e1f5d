"""Distilling a tiny preview VAE (AutoencoderTiny, as TAESD) from a KL teacher through the training loop."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import load_file

from sdvae.cli import main
from sdvae.codec import load_vae
from sdvae.config import load_config
from sdvae.models import build_student, teacher_latents
from sdvae.metrics import reconstruct
from sdvae.presets import preset_config
from sdvae.sources import load_pretrained_vae
from sdvae.train import train
from tests.test_pipeline import tiny_pipeline
from tests.test_train import config

DISTILL_YAML = Path(__file__).resolve().parents[1] / "train" / "configs" / "distill-tiny.yaml"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random-init tiny KL VAE with a scaling factor that is not 1, so a student that ignored it would show."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**preset_config("tiny"), "scaling_factor": 0.5})
    folder = tmp_path_factory.mktemp("teacher")
    vae.save_pretrained(folder)
    return folder


def distill_config(tmp_path, photos, teacher, **overrides):
    values = dict(model="taesd-16", teacher=str(teacher), learning_rate=2e-3, adam_amsgrad=True, adam_beta2=0.9,
                  rec_loss="mse", max_steps=12, batch_size=2, resolution=64, log_every=4, sample_every=6,
                  checkpoint_every=6)
    values.update(overrides)
    return config(tmp_path, photos, **values)


def student_error(student, teacher, images):
    """(encoder MSE against the teacher's scaled mean, decoder MSE of the teacher's latents against the images)."""
    with torch.no_grad():
        target, _ = teacher_latents(teacher, images, None)
        encoded = student.encode(images).latents
        decoded = student.decode(target).sample
    return float((encoded - target).pow(2).mean()), float((decoded - images).pow(2).mean())


@pytest.mark.slow
def test_a_distilled_student_learns_the_teachers_latents_and_loads_in_diffusers(tmp_path, photos, teacher_dir):
    metrics = train(distill_config(tmp_path, photos, teacher_dir))
    assert metrics["model_class"] == "AutoencoderTiny" and metrics["latent_factors"]["measured"] is False
    student = AutoencoderTiny.from_pretrained(tmp_path / "run" / "vae").eval()
    assert student.config.scaling_factor == 1.0 and student.config.shift_factor == 0.0
    assert student.config.latent_channels == 4
    teacher = AutoencoderKL.from_pretrained(teacher_dir).eval()
    images = torch.stack([torch.from_numpy(np.asarray(load_image(p), np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for p in sorted(photos.glob("*.png"))[:4]])
    torch.manual_seed(0)  # the untrained student, initialised as the run's was
    fresh = build_student("taesd-16", teacher).eval()
    before, after = student_error(fresh, teacher, images), student_error(student, teacher, images)
    assert after[0] < 0.75 * before[0] and after[1] < 0.75 * before[1]  # both halves learned
    with torch.no_grad():  # what the encoder learned is the teacher's latents *scaled* (by 0.5 here)
        target, encoded = teacher_latents(teacher, images, None)[0], student.encode(images).latents
    assert (encoded - target).pow(2).mean() < 0.5 * (encoded - target / 0.5).pow(2).mean()
    # the teacher is not trained, and its weights stay out of the checkpoints
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(),
                                                 AutoencoderKL.from_pretrained(teacher_dir).state_dict().values()))
    checkpoint = load_file(tmp_path / "run" / "checkpoint-12" / "model.safetensors")
    assert checkpoint.keys() == {f"vae.{k}" for k in student.state_dict()}
    logged = json.dumps(metrics["last_logged"])
    assert "latent_loss" in logged and '"kl"' not in logged

    # a student from an interrupted run (no vae/ yet) loads from its checkpoint
    shutil.rmtree(tmp_path / "run" / "vae")
    again = load_pretrained_vae(str(tmp_path / "run"))
    assert isinstance(again, AutoencoderTiny)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), student.state_dict().values()))

    # it drops into a StableDiffusionPipeline as `vae`, decoding the diffusion latents as they are
    pipe = tiny_pipeline(student)
    embeds = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))
    run = dict(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=1.0, height=64, width=64)
    latents = pipe(**run, output_type="latent", generator=torch.Generator().manual_seed(2)).images
    shown = pipe(**run, output_type="np", generator=torch.Generator().manual_seed(2)).images
    with torch.no_grad():
        expected = (student.decode(latents).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(shown, expected, atol=1e-5)
    assert reconstruct(student, images).shape == images.shape

    # sdvae's own commands take it: encode / decode through load_vae, and sdvae eval
    codec = load_vae(str(tmp_path / "run"))
    z = codec.encode(images)
    with torch.no_grad():
        torch.testing.assert_close(z, student.encode(images).latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(codec.decode(z, output_type="pt"), student.decode(z).sample.clamp(-1, 1),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="runs whole"):
        codec.encode(images, tiled=True)
    assert main(["eval", "--vae", f"student={tmp_path / 'run'}", "--data", str(photos), "--out",
                 str(tmp_path / "eval"), "--resolution", "64", "--no-download"]) == 0
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())["vaes"]["student"]
    assert 5 < scores["psnr_mean"] < 60


def load_image(path):
    from PIL import Image

    image = Image.open(path).convert("RGB")
    side = min(image.size)
    return image.crop((0, 0, side, side)).resize((64, 64), Image.BICUBIC)


def test_distillation_follows_the_teachers_channels_and_the_published_settings(tmp_path, teacher_dir):
    teacher = AutoencoderKL(**preset_config("tiny-16ch"))
    student = build_student("taesd", teacher)
    assert student.config.latent_channels == 16
    assert sum(p.numel() for p in student.decoder.parameters()) == 1_222_531 + 12 * 64 * 9  # TAESD's, 16 in
    cfg = load_config(DISTILL_YAML, {"teacher": str(teacher_dir)})
    assert (cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_amsgrad, cfg.batch_size) == (
        3e-4, 0.9, 0.9, True, 16)  # TAESD's, as its author gave them
    assert cfg.model == "taesd"


@pytest.mark.parametrize("overrides, message", [
    (dict(model="taesd"), "trains by distillation"),
    (dict(model="tiny", teacher="x"), "set model to one of"),
    (dict(model="taesd", teacher="x", equivariance_weight=1.0), "equivariance_weight with teacher"),
    (dict(model="taesd", teacher="x", gradient_checkpointing=True), "EncoderTiny skips its input scaling"),
    (dict(model="taesd", teacher="x", measure_factors=True), "factors are 1 and 0"),
])
def test_distillation_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_a_missing_teacher_is_named(tmp_path, photos):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(distill_config(tmp_path, photos, tmp_path / "nowhere"))


def test_a_student_exports_as_taesds_own_files_and_they_load_back(tmp_path, vae_dir, capsys):
    from safetensors.torch import save_file

    from sdvae.models import build_vae

    torch.manual_seed(0)
    student = build_student("taesd", build_vae("tiny")).eval()
    student.save_pretrained(tmp_path / "student")
    assert main(["export", str(tmp_path / "student"), "--format", "taesd", "--out", str(tmp_path / "taesd")]) == 0
    encoder, decoder = (load_file(tmp_path / "taesd" / f"taesd_{part}.safetensors") for part in ("encoder", "decoder"))
    # TAESD's nn.Sequential indices: the encoder's convs run 0..14, RGB in at 0 and latents out at 14; the decoder's
    # 1..19 (0 is its parameterless clamp), latents in at 1, RGB out at 19; no diffusers prefixes
    assert encoder["0.weight"].shape == (64, 3, 3, 3) and encoder["14.weight"].shape == (4, 64, 3, 3)
    assert decoder["1.weight"].shape == (64, 4, 3, 3) and decoder["19.weight"].shape == (3, 64, 3, 3)
    assert max(int(k.split(".")[0]) for k in encoder) == 14 and min(int(k.split(".")[0]) for k in decoder) == 1
    assert max(int(k.split(".")[0]) for k in decoder) == 19

    plain = tmp_path / "plain"  # madebyollin's files carry no config: read from the shapes
    plain.mkdir()
    for part, state in (("encoder", encoder), ("decoder", decoder)):
        save_file(state, plain / f"taef1_{part}.safetensors")
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        z = student.encode(x).latents
        for folder in (tmp_path / "taesd", plain):
            back = load_pretrained_vae(str(folder))
            assert isinstance(back, AutoencoderTiny) and back.config.scaling_factor == 1.0
            assert torch.equal(back.encode(x).latents, z)
            assert torch.equal(back.decode(z).sample, student.decode(z).sample)

    capsys.readouterr()
    assert main(["export", str(tmp_path / "student"), "--format", "single-file", "--out",
                 str(tmp_path / "s.safetensors")]) == 2
    assert "--format taesd" in capsys.readouterr().err
    assert main(["export", str(vae_dir), "--format", "taesd", "--out", str(tmp_path / "kl")]) == 2
    assert "tiny student" in capsys.readouterr().err and not (tmp_path / "kl").exists()
