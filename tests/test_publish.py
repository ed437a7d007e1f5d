"""`sdvae publish`: the staged Hugging Face repo (card, diffusers files, single file), offline."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from huggingface_hub import ModelCard
from PIL import Image

from sdvae import publish as publish_module
from sdvae.cli import main
from sdvae.config import load_config, save_config
from sdvae.models import build_student
from sdvae.files import OUTPUT_RECORD, ForeignOutput
from sdvae.models import build_vae
from sdvae.publish import RunFiles, check_repo_id, model_card, stage
from sdvae.sources import load_pretrained_vae

METRICS = {"steps": 42, "validation": {"psnr_mean": 23.456, "ssim_mean": 0.7, "images": 8}}


def fake_run(folder, vae, **config):
    """A run folder as training leaves it: vae/, config.yaml, metrics.json, reconstructions.png."""
    vae.save_pretrained(folder / "vae")
    save_config(load_config(overrides=config), folder / "config.yaml")
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    Image.new("RGB", (8, 8)).save(folder / "reconstructions.png")
    return folder


@pytest.fixture
def tiny_run(tmp_path):
    torch.manual_seed(0)
    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=0.61)
    return fake_run(tmp_path / "run", vae, model="tiny", data="photos")


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line_error(capsys) -> str:
    """The one error line main() printed (warnings may come before it, one line each)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sdvae publish: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def skipped(record) -> list[str]:
    """The messages of publish's warnings about run files it skipped."""
    return [str(w.message) for w in record if "is skipped" in str(w.message)]


@pytest.mark.slow
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
    for text in ("0.61", "| run | 23.4 |", "23.46 dB", "after 42 steps", "(reconstructions.png)", "my-vae.safetensors",
                 'AutoencoderKL.from_pretrained("me/my-vae")', "data: photos",
                 "input | reconstruction | error"):
        assert text in card.text
    assert "(top)" not in card.text  # reconstructions.png is laid out in columns
    assert (staged / "reconstructions.png").is_file() and (staged / OUTPUT_RECORD).is_file()
    assert same_weights(AutoencoderKL.from_pretrained(staged), vae)
    single = load_pretrained_vae(str(staged / "my-vae.safetensors"))
    assert same_weights(single, vae) and single.config.scaling_factor == 0.61


def test_a_tiny_kl_vaes_card_does_not_claim_the_uis_load_it(tiny_run):
    card = ModelCard.load(stage(tiny_run, "me/my-vae", tiny_run / "s") / "README.md").text
    assert "models/vae/" not in card and "models/VAE/" not in card and "loaded strictly" not in card
    assert "Not for ComfyUI or AUTOMATIC1111" in card and "block_out_channels [32, 64, 128, 128]" in card
    assert "or with sdvae" in card and 'from_single_file("my-vae.safetensors", config="me/my-vae")' in card
    # the latent factor note: ComfyUI's fixed factors, and that this VAE's 0.61 is not a 4-channel family's
    assert "ignores the factors in the file" in card and "scaling_factor **0.61**" in card
    assert "differ from those of the 4-channel families (SD1.5 0.18215, SDXL 0.13025)" in card


def test_an_sd_architecture_vaes_card_says_comfyui_and_a1111_load_it():
    vae = build_vae("sd-kl-f8")  # random init, no files: the real ui_incompatibility check on the SD architecture
    card = model_card(vae, "me/sd-vae", "sd-vae", "mit", RunFiles())
    assert "ComfyUI: put `sd-vae.safetensors` in `models/vae/`" in card and "AUTOMATIC1111 / Forge" in card
    assert "Not for ComfyUI" not in card
    assert "These are SD1.5's factors." in card


def test_the_card_follows_ui_incompatibility(monkeypatch):
    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=0.13025)
    monkeypatch.setattr(publish_module, "ui_incompatibility", lambda vae: None)
    card = model_card(vae, "me/v", "v", "mit", RunFiles())
    assert "models/vae/" in card and "Not for ComfyUI" not in card and "These are SDXL's factors." in card
    monkeypatch.setattr(publish_module, "ui_incompatibility", lambda vae: "a reason the UIs cannot")
    card = model_card(vae, "me/v", "v", "mit", RunFiles())
    assert "models/vae/" not in card and "Not for ComfyUI or AUTOMATIC1111 (a reason the UIs cannot)." in card


def test_a_16_channel_vaes_factors_are_compared_with_sd3_and_flux():
    vae = build_vae("tiny-16ch")
    vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    card = model_card(vae, "me/v", "v", "mit", RunFiles())
    assert "These are FLUX's factors." in card and "shift_factor **0.1159**" in card
    vae.register_to_config(scaling_factor=0.9, shift_factor=0.05)
    assert "differ from those of the 16-channel families (SD3 1.5305 with shift 0.0609, FLUX 0.3611 with shift " \
           "0.1159)" in model_card(vae, "me/v", "v", "mit", RunFiles())


def test_a_taesd_student_is_published_with_taesds_files_instead_of_a_single_file(tmp_path):
    torch.manual_seed(0)
    student = build_student("taesd", build_vae("tiny"))
    run = fake_run(tmp_path / "run", student, model="taesd", teacher="runs/teacher")
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


def test_a_student_taesd_clients_cannot_build_gets_no_taesd_files_and_the_card_says_why(tmp_path):
    torch.manual_seed(0)
    student = build_student("taesd-16", build_vae("tiny"))
    run = fake_run(tmp_path / "run", student, model="taesd-16", teacher="runs/teacher")
    staged = stage(run, "me/preview", tmp_path / "s")
    card = ModelCard.load(staged / "README.md").text
    assert not list(staged.glob("taesd_*")) and "models/vae_approx" not in card
    assert "No TAESD files" in card and "64 channels in every block" in card
    assert same_weights(AutoencoderTiny.from_pretrained(staged), student)


@pytest.mark.slow
def test_a_failed_upload_keeps_the_staged_folder_and_says_so(tmp_path, capsys, monkeypatch, vae_dir):
    from huggingface_hub import HfApi

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert main(["publish", str(vae_dir), "--repo-id", "me/x", "--out", str(tmp_path / "s")]) == 2
    err = one_line_error(capsys)
    assert "upload to me/x failed (Network is unreachable)" in err and str(tmp_path / "s") in err
    assert (tmp_path / "s" / "README.md").is_file()


def test_sdvaes_output_record_is_not_uploaded(tmp_path, monkeypatch, vae_dir):
    from huggingface_hub import HfApi

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: uploads.append(kwargs) or "done")
    assert main(["publish", str(vae_dir), "--repo-id", "me/x", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / OUTPUT_RECORD).is_file()
    assert {OUTPUT_RECORD, ".sdvae.lock"} <= set(uploads[0]["ignore_patterns"])


@pytest.mark.parametrize("args, message", [
    (["--repo-id", "no-owner"], "--repo-id must be owner/name"),
    (["--repo-id", "me/x", "--out", "{stranger}"], "sdvae did not write"),
])
def test_bad_publish_arguments_are_one_line_errors(tmp_path, capsys, vae_dir, args, message):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep me")
    args = [a.format(stranger=stranger) for a in args]
    assert main(["publish", str(vae_dir), "--dry-run", *args]) == 2
    assert message in one_line_error(capsys)
    assert (stranger / "precious.txt").read_text() == "keep me"


BAD_REPO_IDS = ["../..", "a/b/c", "owner/", "/name", "owner/na me", "owner/-x", "owner/x-", "owner/.x", "owner/x.",
                "owner/x..y", "owner/x--y", "-owner/x", "own..er/x", "owner/" + "n" * 100, "owner/x.git", "owner/näme",
                "owner\\x", ""]


@pytest.mark.parametrize("repo_id", BAD_REPO_IDS)
def test_a_repo_id_the_hub_would_refuse_is_one_line_naming_repo_id(tmp_path, capsys, vae_dir, repo_id):
    assert main(["publish", str(vae_dir), "--dry-run", f"--repo-id={repo_id}", "--out", str(tmp_path / "s")]) == 2
    assert "--repo-id" in one_line_error(capsys)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("repo_id", ["me/my-vae", "stabilityai/sd-vae-ft-mse", "Org_1/vae.v2", "a/b", "0/9",
                                     "owner/" + "n" * 96, "my-org/x_y-z.1"])
def test_repo_ids_the_hub_takes_are_accepted(repo_id):
    check_repo_id(repo_id)


def hub_clone(folder):
    """A folder as `git clone https://huggingface.co/owner/name` leaves it."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "README.md").write_text("# the card on the Hub\n")
    return folder


def test_a_clone_of_a_hub_repo_is_never_replaced_without_overwrite(tmp_path, capsys, tiny_run):
    clone = hub_clone(tmp_path / "clone")
    assert main(["publish", str(tiny_run), "--repo-id", "me/x", "--dry-run", "--out", str(clone)]) == 2
    err = one_line_error(capsys)
    assert str(clone) in err and "--overwrite" in err
    with pytest.raises(ForeignOutput):
        stage(tiny_run, "me/x", clone)
    assert (clone / "README.md").read_text() == "# the card on the Hub\n" and (clone / ".git" / "HEAD").is_file()
    assert sorted(p.name for p in clone.iterdir()) == [".git", "README.md"]
    assert main(["publish", str(tiny_run), "--repo-id", "me/x", "--dry-run", "--out", str(clone), "--overwrite"]) == 0
    assert not (clone / ".git").exists() and (clone / "config.json").is_file() and (clone / OUTPUT_RECORD).is_file()


def test_publishing_twice_into_the_default_folder_replaces_the_first(tiny_run, capsys):
    assert main(["publish", str(tiny_run), "--repo-id", "me/first", "--dry-run"]) == 0
    assert (tiny_run / "publish" / "first.safetensors").is_file()
    assert main(["publish", str(tiny_run), "--repo-id", "me/second", "--dry-run"]) == 0
    staged = tiny_run / "publish"
    assert (staged / "second.safetensors").is_file() and not (staged / "first.safetensors").exists()
    assert "# second" in (staged / "README.md").read_text()


def test_a_folder_with_a_file_added_after_staging_is_not_replaced(tiny_run):
    staged = stage(tiny_run, "me/x", tiny_run / "publish")
    (staged / "notes.txt").write_text("mine")
    with pytest.raises(ForeignOutput):
        stage(tiny_run, "me/x", staged)
    assert (staged / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("out", ["{run}", "{run}/..", "{run}/vae/.."])
def test_out_is_never_the_run_being_published_even_with_overwrite(tiny_run, out):
    with pytest.raises(ValueError, match="--out .* holds the VAE being published"):
        stage(tiny_run, "me/x", out.format(run=tiny_run), overwrite=True)
    assert (tiny_run / "vae" / "config.json").is_file() and (tiny_run / "metrics.json").is_file()


def deep_json(n=100_000):
    return "[" * n + "]" * n


# Damaged optional run files: (file, contents written as bytes, or "dir" / "loop", what the card then lacks)
DAMAGED_EXTRAS = [
    ("metrics.json", b"\xff\xfe not utf-8", "23.46 dB"),
    ("metrics.json", b"{not json", "23.46 dB"),
    ("metrics.json", b"[1, 2, 3]", "23.46 dB"),
    ("metrics.json", b"null", "23.46 dB"),
    ("metrics.json", deep_json().encode(), "23.46 dB"),
    ("metrics.json", json.dumps({"steps": 42, "validation": "good"}).encode(), "23.46 dB"),
    ("metrics.json", json.dumps({"steps": 42, "validation": [23.4]}).encode(), "23.46 dB"),
    ("metrics.json", json.dumps({**METRICS, "validation": {**METRICS["validation"], "psnr_mean": "23"}}).encode(),
     "23.46 dB"),
    ("metrics.json", json.dumps({**METRICS, "validation": {**METRICS["validation"], "ssim_mean": None}}).encode(),
     "23.46 dB"),
    ("metrics.json", json.dumps({**METRICS, "validation": {**METRICS["validation"], "images": 8.5}}).encode(),
     "23.46 dB"),
    ("metrics.json", json.dumps({**METRICS, "validation": {**METRICS["validation"], "psnr_mean": True}}).encode(),
     "23.46 dB"),
    ("metrics.json", b'{"steps": 42, "validation": {"psnr_mean": NaN, "ssim_mean": 0.7, "images": 8}}', "23.46 dB"),
    ("metrics.json", b'{"steps": 42, "validation": {"psnr_mean": 1' + b"0" * 400 + b', "ssim_mean": 0.7, '
                     b'"images": 8}}', "23.46 dB"),
    ("metrics.json", json.dumps({**METRICS, "steps": "many"}).encode(), "23.46 dB"),
    ("metrics.json", "dir", "23.46 dB"),
    ("metrics.json", "loop", "23.46 dB"),
    ("eval/table.md", b"| VAE | PSNR |\n| run | \xff\xfe |\n", "## Evaluation"),
    ("eval/table.md", "dir", "## Evaluation"),
    ("eval/table.md", "loop", "## Evaluation"),
    ("eval/table.md", b"x" * 1_000_001, "## Evaluation"),
    ("reconstructions.png", b"not a png", "(reconstructions.png)"),
    ("reconstructions.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "(reconstructions.png)"),
    ("reconstructions.png", "dir", "(reconstructions.png)"),
    ("eval/grid.png", b"GIF89a broken", "(grid.png)"),
]


def damage(path, contents):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        path.unlink()
    if contents == "dir":
        path.mkdir()
    elif contents == "loop":
        path.symlink_to(path.name)  # a link to itself: stat fails with ELOOP, as for a file that cannot be read
    else:
        path.write_bytes(contents)


@pytest.mark.slow
@pytest.mark.parametrize("name, contents, section", DAMAGED_EXTRAS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(DAMAGED_EXTRAS)])
def test_a_damaged_optional_run_file_is_skipped_with_one_warning_naming_it(tiny_run, recwarn, name, contents,
                                                                            section):
    (tiny_run / "eval").mkdir()
    (tiny_run / "eval" / "table.md").write_text("| VAE | PSNR |\n|---|---|\n| run | 23.4 |\n")
    Image.new("RGB", (8, 8)).save(tiny_run / "eval" / "grid.png")
    damage(tiny_run / name, contents)
    staged = stage(tiny_run, "me/x", tiny_run / "publish")
    warnings = skipped(recwarn)
    assert len(warnings) == 1 and str(tiny_run / name) in warnings[0] and "\n" not in warnings[0], warnings
    card = (staged / "README.md").read_text()
    assert section not in card
    assert "## Training configuration" in card and "AutoencoderKL.from_pretrained" in card  # the rest is there
    assert not (staged / "metrics.json").exists() and not (staged / "table.md").exists()
    if name.endswith(".png"):
        assert not (staged / name.split("/")[-1]).exists()


def test_a_damaged_extra_through_the_cli_still_publishes_with_a_one_line_warning(tiny_run, capsys):
    (tiny_run / "metrics.json").write_text('{"validation": "23 dB"}')
    assert main(["publish", str(tiny_run), "--repo-id", "me/x", "--dry-run"]) == 0
    assert f"sdvae publish: warning: {tiny_run / 'metrics.json'} is skipped (validation is a JSON str, not an " \
           f"object)" in capsys.readouterr().err
    assert "23 dB" not in (tiny_run / "publish" / "README.md").read_text()


def test_a_run_without_validation_or_extras_has_a_card_without_those_sections(tiny_run, recwarn):
    (tiny_run / "metrics.json").write_text(json.dumps({"steps": 3}))
    (tiny_run / "reconstructions.png").unlink()
    card = (stage(tiny_run, "me/x", tiny_run / "publish") / "README.md").read_text()
    assert not skipped(recwarn)  # absent is not damaged: no warning
    assert "## Held-out" not in card and "## Evaluation" not in card and "![" not in card


@pytest.mark.parametrize("contents, message", [
    (b"model: tiny\ndata: \xff\xfe\n", "is not a text file"),
    (b"model: [tiny\n", "not valid YAML"),
    (b"- a\n- list\n", "must hold a mapping"),
    ("dir", "cannot be read (not a regular file)"),
    ("loop", "cannot be read"),
])
def test_a_damaged_config_yaml_is_one_error_naming_it(tiny_run, capsys, contents, message):
    damage(tiny_run / "config.yaml", contents)
    assert main(["publish", str(tiny_run), "--repo-id", "me/x", "--dry-run"]) == 2
    err = one_line_error(capsys)
    assert str(tiny_run / "config.yaml") in err and message in err
    assert not (tiny_run / "publish").exists()
