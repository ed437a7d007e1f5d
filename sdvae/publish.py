"""`sdvae publish`: a trained VAE staged as a Hugging Face model repository (model card, diffusers files, the single
file UIs load) and uploaded with huggingface_hub when there is a network.

Layout of the staged folder (as stabilityai/sd-vae-ft-mse): config.json and diffusion_pytorch_model.safetensors at
the top, `<name>.safetensors` in the LDM layout beside them (KL VAEs), README.md, and the run's pictures.

What the run folder holds besides the VAE is read with care. config.yaml is the run's record of what it is (a
student's teacher): when it is there but damaged, publishing stops with one error naming it. metrics.json,
eval/table.md and the pictures are extras: a damaged one is left out of the card with a one-line warning naming it.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import HfApi
from PIL import Image

from .cache_reader import read_manifest
from .config import read_config_file
from .export import save_diffusers, save_single_file, save_taesd, taesd_incompatibility, ui_incompatibility
from .files import LOCK_NAME, OUTPUT_RECORD, describe_error, output_folder, printable, refuse_foreign_output
from .sources import load_pretrained_vae
from .weights import is_tiny

# The run's pictures the card shows, with their alt text (what each picture's layout is).
PICTURES = {
    "reconstructions.png": "held-out images, one per row, in columns: input | reconstruction | error (4x, heat map)",
    "eval/grid.png": "sdvae eval grid: per image, rows of the input and each VAE's reconstruction, a zoomed detail "
                     "and the error heat map",
}
MAX_TEXT_BYTES = 1_000_000  # a metrics.json or table.md larger than this is not something to paste into a card

# The Hub's rule for repo names (huggingface_hub's validate_repo_id accepts non-ASCII letters, the Hub does not).
REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
MAX_REPO_NAME = 96

# The latent factors ComfyUI applies per model family, whatever the VAE file says: (family, scaling, shift).
FAMILY_FACTORS = {
    4: (("SD1.5", 0.18215, None), ("SDXL", 0.13025, None)),
    16: (("SD3", 1.5305, 0.0609), ("FLUX", 0.3611, 0.1159)),
}
NOT_UPLOADED = [OUTPUT_RECORD, LOCK_NAME]  # sdvae's bookkeeping in the staged folder, not part of the model repo


@dataclass
class RunFiles:
    """What the card shows from the run folder, each part None (or empty) when absent or skipped as damaged."""
    config: dict | None = None
    table: str | None = None
    validation: str | None = None  # the held-out sentence from metrics.json
    pictures: list[str] = field(default_factory=list)  # keys of PICTURES present and readable


def stage(run: str | Path, repo_id: str, out: str | Path, license: str = "apache-2.0",
          overwrite: bool = False) -> Path:
    """Write the folder `publish` would upload into `out` (whole or not at all) and return it. An `out` holding
    anything sdvae did not write (a clone of the Hub repo, say) is refused unless `overwrite`."""
    check_repo_id(repo_id)
    run, out = Path(run), Path(out)
    check_out(run, out)
    refuse_foreign_output(out, overwrite)  # before the VAE is loaded: the refusal should not wait for it
    files = RunFiles(config=read_config(run))
    vae = load_pretrained_vae(str(run))
    files.table, files.validation = read_table(run), read_validation(run)
    files.pictures = [p for p in PICTURES if readable_picture(run / p)]
    name = repo_id.split("/")[1]
    with output_folder(out, "publish", overwrite) as tmp:
        write_weights(vae, tmp, name, source=str(run))
        files.pictures = [p for p in files.pictures if copy_picture(run / p, tmp / Path(p).name)]
        (tmp / "README.md").write_text(model_card(vae, repo_id, name, license, files), encoding="utf-8")
    return out


def check_repo_id(repo_id: str) -> None:
    """owner/name as the Hub allows them; anything else would fail the upload late, or (`../..`) name files outside
    the staged folder."""
    parts = repo_id.split("/")
    if len(parts) != 2:
        raise ValueError(f"--repo-id must be owner/name, got {repo_id!r}")
    for what, part in zip(("owner", "name"), parts):
        if not REPO_PART.fullmatch(part) or "--" in part or ".." in part:
            raise ValueError(f"--repo-id {repo_id!r}: the {what} must be letters, digits, '-', '_' or '.', not start "
                             f"or end with '-' or '.', and hold no '--' or '..'")
    if len(parts[1]) > MAX_REPO_NAME or parts[1].endswith(".git"):
        raise ValueError(f"--repo-id {repo_id!r}: the name must be at most {MAX_REPO_NAME} characters and not end "
                         f"with '.git'")


def check_out(run: Path, out: Path) -> None:
    """`out` is replaced whole: never the run being published or a folder holding it, not even with overwrite."""
    run_at, out_at = run.resolve(), out.resolve()
    if out_at == run_at or out_at in run_at.parents:
        raise ValueError(f"--out {printable(out)} holds the VAE being published ({printable(run)}) and would be "
                         f"replaced by the staged folder; choose another --out")


def write_weights(vae, folder: Path, name: str, source: str) -> None:
    """The diffusers files at the top; beside them the files the UIs load, when they can load this VAE. The writers
    write inside our own temporary folder, where nothing can be someone else's: overwrite=True."""
    move_up(save_diffusers(vae, folder / "diffusers", overwrite=True))
    if not is_tiny(vae):  # the LDM single file: the UIs' format, and sdvae reads it whatever the architecture
        save_single_file(vae, folder / f"{name}.safetensors", source=source, overwrite=True)
    elif taesd_incompatibility(vae) is None:  # TAESD's own files, as madebyollin/taesd has them
        move_up(save_taesd(vae, folder / "taesd", source=source, overwrite=True))


def move_up(folder: Path) -> None:
    """The files of `folder` into its parent (the exporters write whole folders; the repo has them at its top). An
    exporter's own output record is dropped: the staged folder gets one record, written last."""
    for f in folder.iterdir():
        if f.name in NOT_UPLOADED:
            f.unlink()
        else:
            f.rename(folder.parent / f.name)
    folder.rmdir()


def regular_file(path: Path) -> bool:
    """False when nothing is there; raises when something is there that cannot be read as a file (a folder, a pipe
    whose read would block, a link loop, a folder we may not look into)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not stat.S_ISREG(mode):
        raise ValueError("not a regular file")
    return True


def skip(path: Path, reason: BaseException | str) -> None:
    """One warning line (the CLI shows it as `sdvae publish: warning: ...`) for an optional run file the card is made
    without."""
    why = "not UTF-8 text" if isinstance(reason, UnicodeDecodeError) else \
        describe_error(reason) if isinstance(reason, BaseException) else reason
    warnings.warn(f"{printable(path)} is skipped ({why}): the model card has no section from it", stacklevel=2)


def read_optional_text(path: Path) -> str | None:
    """An optional run file's UTF-8 text; None (with a warning when it is there but damaged) otherwise."""
    try:
        if not regular_file(path):
            return None
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
        if len(data) > MAX_TEXT_BYTES:
            raise ValueError(f"larger than {MAX_TEXT_BYTES:,} bytes")
        return data.decode("utf-8")
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        skip(path, e)
        return None


def read_config(run: Path) -> dict | None:
    """config.yaml, or None when the run has none; when it is there but damaged, one error naming it (the card would
    otherwise leave out what the run is, a student's teacher among it)."""
    path = run / "config.yaml"
    try:
        return read_config_file(path) if regular_file(path) else None
    except ValueError as e:
        if str(path) in str(e):  # read_config_file's own messages name the file and the line
            raise
        raise ValueError(f"{printable(path)} cannot be read ({describe_error(e)})") from None
    except OSError as e:
        raise ValueError(f"{printable(path)} cannot be read ({describe_error(e)})") from None


def read_table(run: Path) -> str | None:
    """`sdvae eval`'s table, when the run has one (an empty one shows nothing)."""
    text = read_optional_text(run / "eval" / "table.md")
    return text.strip() if text and text.strip() else None


def read_validation(run: Path) -> str | None:
    """The held-out sentence from metrics.json, or None: no file, no validation in it, or a damaged file (a
    warning)."""
    path = run / "metrics.json"
    text = read_optional_text(path)
    if text is None:
        return None
    try:
        metrics = json.loads(text)
        if not isinstance(metrics, dict):
            raise ValueError(f"a JSON {type(metrics).__name__}, not an object")
        return validation_sentence(metrics)
    except (ValueError, RecursionError) as e:  # json's errors are ValueErrors; a deep nesting is a RecursionError
        skip(path, e)
        return None


def validation_sentence(metrics: dict) -> str | None:
    """What training measured on held-out crops, as one sentence; a field of the wrong type raises ValueError."""
    validation = metrics.get("validation")
    if validation is None:
        return None
    if not isinstance(validation, dict):
        raise ValueError(f"validation is a JSON {type(validation).__name__}, not an object")
    psnr, ssim = number(validation, "psnr_mean"), number(validation, "ssim_mean")
    images = count(validation, "images")
    steps = count(metrics, "steps") if metrics.get("steps") is not None else None
    after = f", after {steps} steps" if steps is not None else ""
    return f"PSNR {psnr:.2f} dB, SSIM {ssim:.4f} on {images} held-out crops{after}."


def number(values: dict, key: str) -> float:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} is {json.dumps(value)[:40]}, not a number")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{key} is too large a number") from None
    if math.isnan(value):
        raise ValueError(f"{key} is NaN")
    return value


def count(values: dict, key: str) -> int:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} is {json.dumps(value)[:40]}, not a count")
    return value


def readable_picture(path: Path) -> bool:
    """Whether the run's picture is there and an image; a damaged one is skipped with a warning."""
    try:
        if not regular_file(path):
            return False
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, struct.error...) for a damaged file
        skip(path, e)
        return False


def copy_picture(source: Path, target: Path) -> bool:
    try:
        shutil.copyfile(source, target)
        return True
    except OSError as e:  # the card is made without it; never a half-copied picture in the repo
        target.unlink(missing_ok=True)
        skip(source, e)
        return False


def model_card(vae, repo_id: str, name: str, license: str, files: RunFiles) -> str:
    class_name = type(vae).__name__  # AutoencoderKL / AutoencoderTiny: what diffusers users load it with
    config = files.config or {}
    meta = dict(library_name="diffusers", license=license,
                tags=["sdvae", "vae", "autoencoder", "stable-diffusion", class_name])
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"A {vae.config.latent_channels}-channel {class_name} ({downsampling(vae)}x downsampling) trained with sdvae. "
             f"Latents for diffusion: `(z - shift_factor) * scaling_factor` with scaling_factor **{scale:.6g}**"
             + (f" and shift_factor **{shift:.6g}**." if shift else "."), ""]
    if config.get("teacher"):
        lines += [f"A tiny preview decoder distilled from `{config['teacher']}`: it takes that VAE's *scaled* latents "
                  f"as they are (its own factors are 1 and 0).", ""]
    lines += usage(vae, repo_id)
    lines += previews(vae) if is_tiny(vae) else clients(vae, repo_id, name)
    lines += results(files)
    if files.config:
        lines += ["## Training configuration", "", "```yaml", yaml.safe_dump(files.config, sort_keys=False).strip(),
                  "```", ""]
    return "\n".join(lines)


def downsampling(vae) -> int:
    """Each block after the first halves the image (KL VAEs and TAESD's students alike)."""
    blocks = vae.config.get("block_out_channels") or vae.config.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def usage(vae, repo_id: str) -> list:
    class_name = type(vae).__name__
    return ["## Use it", "", "```python", f"from diffusers import {class_name}", "",
            f'vae = {class_name}.from_pretrained("{repo_id}")',
            *(["latents = vae.encode(images).latents  # images: (B, 3, H, W) in [-1, 1]; already scaled"]
              if is_tiny(vae) else [
              "z = vae.encode(images).latent_dist.mode()  # images: (B, 3, H, W) in [-1, 1]",
              "latents = (z - (vae.config.shift_factor or 0)) * vae.config.scaling_factor  # what diffusion sees",
              "images = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0)).sample"]),
            "# or in a diffusers pipeline trained on these latents: Pipeline.from_pretrained(..., vae=vae)",
            "```", ""]


def clients(vae, repo_id: str, name: str) -> list:
    """Which programs load a KL VAE's files: the UIs only build the SD architecture, so they are named only when
    this VAE is that."""
    reason = ui_incompatibility(vae)
    if reason is None:
        lines = [f"ComfyUI: put `{name}.safetensors` in `models/vae/`; AUTOMATIC1111 / Forge: in `models/VAE/`, then "
                 f"choose it as the SD VAE. It is the original LDM layout, loaded strictly.", ""]
    else:
        # diffusers' from_single_file builds SD 1.5's VAE unless given this repo's config.json
        lines = [f"Load it with diffusers (`AutoencoderKL.from_pretrained(\"{repo_id}\")`, above; the single file "
                 f"with `AutoencoderKL.from_single_file(\"{name}.safetensors\", config=\"{repo_id}\")`) or with "
                 f"sdvae, which reads `{name}.safetensors` as it is (the LDM layout, its architecture in the file's "
                 f"metadata). Not for ComfyUI or AUTOMATIC1111 ({reason}).", ""]
    return lines + factors_note(vae)


def factors_note(vae) -> list:
    """ComfyUI scales latents by its model family's fixed factors, never the VAE file's: say what that means for a
    diffusion model trained on this VAE."""
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor")
    channels = vae.config.latent_channels
    own = f"scaling_factor **{scale:.6g}**" + (f" and shift_factor **{shift:.6g}**" if shift else "")
    families = FAMILY_FACTORS.get(channels, ())
    same = [family for family, s, f in families
            if math.isclose(scale, s, rel_tol=1e-3) and math.isclose(shift or 0.0, f or 0.0, abs_tol=1e-4)]
    if same:
        compared = f"These are {same[0]}'s factors."
    elif families:
        listed = ", ".join(f"{family} {s}" + (f" with shift {f}" if f else "") for family, s, f in families)
        compared = (f"They differ from those of the {channels}-channel families ({listed}): ComfyUI would use the "
                    f"family's, not this VAE's.")
    else:
        compared = f"No model family has {channels} latent channels."
    return ["Latent factors: ComfyUI applies each model family's fixed factors (SD1.5 0.18215, SDXL 0.13025, SD3 "
            "1.5305 with shift 0.0609, FLUX 0.3611 with shift 0.1159) and ignores the factors in the file. A "
            f"diffusion model trained on this VAE's latents with its {own} needs them set in the trainer's or "
            f"pipeline's config, not in the UI. {compared}", ""]


def previews(vae) -> list:
    """A tiny student: TAESD's files for ComfyUI's previews when TAESD clients can build it, else why not."""
    reason = taesd_incompatibility(vae)
    if reason is not None:
        return [f"No TAESD files (ComfyUI's live previews): {reason}.", ""]
    return ["ComfyUI live previews: put `taesd_decoder.safetensors` (and `taesd_encoder.safetensors`) in "
            "`models/vae_approx/`, named for the teacher's family (`taesd_`, `taesdxl_`, `taesd3_`, `taef1_`). "
            "They are TAESD's own layout.", ""]


def results(files: RunFiles) -> list:
    lines = []
    if files.table:
        lines += ["## Evaluation (`sdvae eval`)", "", files.table, ""]
    if files.validation:
        lines += ["## Held-out reconstruction at the end of training", "", files.validation, ""]
    for picture in files.pictures:
        lines += [f"![{PICTURES[picture]}]({Path(picture).name})", ""]
    return lines


def is_latent_cache(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file() or (Path(path) / "done").is_dir()


def stage_cache(cache: str | Path, repo_id: str) -> Path:
    """A complete latent cache (sdvae cache-latents) is a dataset repo as it is: its card names the parquet shards
    for `datasets.load_dataset`. Only its claims and sdvae's bookkeeping stay behind."""
    check_repo_id(repo_id)
    read_manifest(cache)  # an incomplete or older cache is one error saying what to do
    return Path(cache)


CACHE_NOT_UPLOADED = [*NOT_UPLOADED, "claims/*", ".*"]


def publish(folder: Path, repo_id: str, private: bool, repo_type: str = "model") -> str:
    """Upload the staged folder; one error line that says where the folder is when the hub cannot be reached."""
    api = HfApi()
    ignored = CACHE_NOT_UPLOADED if repo_type == "dataset" else NOT_UPLOADED
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                                   commit_message="Upload with sdvae publish", ignore_patterns=ignored)
    except Exception as e:  # no network, no token, no permission: all end with the staged folder kept
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = " --repo-type dataset" if repo_type == "dataset" else ""
        raise ConnectionError(f"upload to {repo_id} failed ({first}); the staged folder is {folder}: upload it "
                              f"later with `huggingface-cli upload{kind} {repo_id} {folder}`") from None
    return str(getattr(commit, "commit_url", commit))
