"""`sdvae publish`: the staged Hugging Face repo (card, diffusers files, single file), offline."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from huggingface_hub import ModelCard

from sdvae.cli import main
from sdvae.config import load_config, save_config
from sdvae.distill import build_student
from sdvae.models import build_vae
from sdvae.sources import load_pretrained_vae


def fake_run(folder, vae, **config):
    """A run folder as training leaves it: vae/, config.yaml, metrics.json, reconstructions.png."""
    vae.save_pretrained(folder / "vae")
    save_config(load_config(overrides=config), folder / "config.yaml")
    (folder / "metrics.json").write_text(json.dumps({"steps": 42, "validation": {
        "psnr_mean": 23.456, "ssim_mean": 0.7, "images": 8}}))
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "reconstructions.png")
    return folder


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_dry_run_stages_a_card_and_files_that_load(tmp_path, capsys):
    torch.manual_seed(0)
    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=0.61)
    run = fake_run(tmp_path / "run", vae, model="tiny", data="photos")
    (run / "eval").mkdir()
    (run / "eval" / "table.md").write_text("| VAE | PSNR |\n|---|---|\n| run | 23.4 |\n")
    assert main(["publish", str(run), "--repo-id", "me/my-vae", "--dry-run"]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    staged = run / "publish"
    card = ModelCard.load(staged / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    assert "sdvae" in card.data.tags and "AutoencoderKL" in card.data.tags
    for text in ("0.61", "| run | 23.4 |", "23.46 dB", "(reconstructions.png)", "my-vae.safetensors", "models/vae/",
                 'AutoencoderKL.from_pretrained("me/my-vae")', "data: photos"):
        assert text in card.text
    assert (staged / "reconstructions.png").is_file()
    assert same_weights(AutoencoderKL.from_pretrained(staged), vae)
    single = load_pretrained_vae(str(staged / "my-vae.safetensors"))
    assert same_weights(single, vae) and single.config.scaling_factor == 0.61


def test_a_student_is_published_with_taesds_files_instead_of_a_single_file(tmp_path, capsys):
    torch.manual_seed(0)
    student = build_student("taesd-16", build_vae("tiny"))
    run = fake_run(tmp_path / "run", student, model="taesd-16", teacher="runs/teacher")
    assert main(["publish", str(run), "--repo-id", "me/preview", "--dry-run", "--out", str(tmp_path / "s")]) == 0
    card = ModelCard.load(tmp_path / "s" / "README.md")
    assert "AutoencoderTiny" in card.data.tags and "runs/teacher" in card.text
    assert not list((tmp_path / "s").glob("preview.safetensors"))
    assert same_weights(AutoencoderTiny.from_pretrained(tmp_path / "s"), student)
    assert "models/vae_approx" in card.text
    taesd = tmp_path / "taesd"  # TAESD's own files, staged beside the diffusers ones
    taesd.mkdir()
    for part in ("encoder", "decoder"):
        (tmp_path / "s" / f"taesd_{part}.safetensors").rename(taesd / f"taesd_{part}.safetensors")
    assert same_weights(load_pretrained_vae(str(taesd)), student)


def test_a_failed_upload_keeps_the_staged_folder_and_says_so(tmp_path, capsys, monkeypatch, vae_dir):
    from huggingface_hub import HfApi

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert main(["publish", str(vae_dir), "--repo-id", "me/x", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "upload to me/x failed (Network is unreachable)" in err and str(tmp_path / "s") in err
    assert (tmp_path / "s" / "README.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["--repo-id", "no-owner"], "owner/name"),
    (["--repo-id", "me/x", "--out", "{stranger}"], "did not stage"),
])
def test_bad_publish_arguments_are_one_line_errors(tmp_path, capsys, vae_dir, args, message):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep me")
    args = [a.format(stranger=stranger) for a in args]
    assert main(["publish", str(vae_dir), "--dry-run", *args]) == 2
    assert message in capsys.readouterr().err
    assert (stranger / "precious.txt").read_text() == "keep me"
