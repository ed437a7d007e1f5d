"""Checkpoints of a training run: written atomically, verified before a resume, pruned crash-safely.

checkpoint-N/ holds Accelerate's state (models, optimisers, sampler, RNG), ema.safetensors, vae_config.json and,
written last, trainer_state.json: the loop's position and the size of every file, so that a truncated file is
found before it is loaded.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import read_config_file
from .files import atomic_write, fsync_tree, remove_tree, replace_folder, write_failure
from .processes import all_processes_agree
from .weights import (assert_finite, check_config, load_strict, read_config_json, read_state_dict, safetensors_header,
                      vae_class)

log = logging.getLogger("sdvae")
STATE_NAME = "trainer_state.json"


class CheckpointError(ValueError):
    pass


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint and restored from it."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped: set = field(default_factory=set)  # names of unreadable files
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    train_seconds: float = 0.0  # wall time trained so far, over every resume: max_minutes and the schedule count it
    ema: dict | None = None  # EMAModel.state_dict() without its tensors (those are in ema.safetensors)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "skipped": sorted(self.skipped)}

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainState":
        path = Path(checkpoint) / STATE_NAME
        try:
            values = json.loads(path.read_text())
            names = {f.name for f in dataclasses.fields(cls)}
            state = cls(**{k: v for k, v in values.items() if k in names})
            state.skipped = set(state.skipped)
            int(state.step) + int(state.epoch) + int(state.batch_in_epoch)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from None
        return state


def step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def completed_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders that were renamed into place (they hold trainer_state.json), oldest first."""
    done = [p for p in Path(out).glob("checkpoint-*") if p.name[11:].isdigit() and (p / STATE_NAME).is_file()]
    return sorted(done, key=step_of)


def last_good(out: Path) -> str:
    done = completed_checkpoints(out)
    return f"{done[-1]} is intact" if done else "no checkpoint had been written yet"


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why this checkpoint cannot be resumed from, or None: its state file parses, every file has the size
    recorded when it was written, safetensors headers fit their files and torch files have their zip index."""
    checkpoint = Path(checkpoint)
    try:
        TrainState.read(checkpoint)
        recorded = json.loads((checkpoint / STATE_NAME).read_text()).get("files", {})
    except CheckpointError as e:
        return str(e)
    for name, size in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    for path in sorted(checkpoint.iterdir()):
        problem = _safetensors_problem(path) if path.suffix == ".safetensors" else \
            _zip_problem(path) if path.suffix in (".bin", ".pkl", ".pt") else None
        if problem:
            return problem
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        safetensors_header(path)
    except ValueError as e:
        return str(e)  # names the file
    return None


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path):  # torch.save's format; a truncated file has lost its central directory
            return None
    except (zipfile.BadZipFile, OSError) as e:
        return f"{path} is damaged ({e})"


def find_checkpoint(out: Path, resume: str) -> Path:
    """`--resume latest`: the newest checkpoint that verifies (damaged ones are named and passed over);
    `--resume PATH`: that checkpoint, or an error naming what is damaged."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"not a complete sdvae checkpoint: {path} (no {STATE_NAME})")
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        return path
    done = completed_checkpoints(out)
    for checkpoint in reversed(done):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        log.warning("%s is damaged and not resumed from: %s", checkpoint, problem)
    raise FileNotFoundError(f"--resume latest: no {'undamaged ' if done else ''}checkpoint in {out}")


def set_aside_later_checkpoints(out: Path, step: int, say) -> None:
    """A new run, or a resume from an earlier step, starts a new timeline: the later checkpoints of the old one
    are renamed, not deleted, so that pruning cannot remove the new ones in their favour nor `resume=latest`
    pick them."""
    for later in completed_checkpoints(out):
        if step_of(later) > step:
            aside = later.with_name(f"superseded-{later.name}")
            remove_tree(aside)
            later.rename(aside)
            say(f"{later} belongs to an earlier run (it is past step {step}, where this one starts): "
                f"moved to {aside}")


def save_checkpoint(accelerator, out: Path, state: TrainState, keep: int, vae, ema=None, trained_names=()) -> None:
    """Every process writes its part into a temporary folder; the main process adds the EMA, the VAE config and
    the state file, syncs and renames it. A failure on any process (a full disk) fails all of them together,
    with the temporary folder removed and the previous checkpoints untouched."""
    name, error = f"checkpoint-{state.step}", None
    final = Path(out) / name
    tmp = final.with_name(f".{name}.tmp")
    try:
        if accelerator.is_main_process:
            remove_tree(tmp)
            tmp.mkdir()
    except OSError as e:
        error = e
    if all_processes_agree(accelerator, error is None):
        try:
            accelerator.save_state(str(tmp))
        except Exception as e:  # torch reports a full disk as a RuntimeError ("unexpected pos")
            error = e
    if all_processes_agree(accelerator, error is None) and accelerator.is_main_process:
        try:
            _finish(accelerator, final, tmp, state, vae, ema, trained_names)
            prune(out, keep)
        except Exception as e:
            error = e
    ok = all_processes_agree(accelerator, error is None)
    if not ok:
        cause = error
        while cause is not None:  # their frames hold the writer that failed, and with it an open file in tmp
            cause.__traceback__, cause = None, cause.__context__
        gc.collect()
        if accelerator.is_main_process:
            remove_tree(tmp)
        raise write_failure(error, name, last_good(out)) if error else RuntimeError(
            f"another process failed while writing {name}; {last_good(out)}")


def _finish(accelerator, final: Path, tmp: Path, state: TrainState, vae, ema, trained_names) -> None:
    assert_finite(vae.state_dict(), f"the weights of {final.name}")
    values = state.to_dict()
    if ema is not None:
        ema_state = ema.state_dict()
        shadow = ema_state.pop("shadow_params")
        tensors = {n: t.detach().contiguous().cpu() for n, t in zip(trained_names, shadow)}
        assert_finite(tensors, f"the EMA weights of {final.name}")
        save_file(tensors, str(tmp / "ema.safetensors"))
        values["ema"] = ema_state
    atomic_write(tmp / "vae_config.json", vae.to_json_string())
    values["files"] = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
    atomic_write(tmp / STATE_NAME, json.dumps(values))  # last: its presence marks the checkpoint complete
    fsync_tree(tmp)
    replace_folder(tmp, final)


def prune(out: Path, keep: int) -> None:
    if keep > 0:
        for old in completed_checkpoints(out)[:-keep]:
            remove_tree(old)  # renamed away first: a kill mid-delete never leaves a "complete" checkpoint


def load_ema(ema, checkpoint: Path, ema_state: dict, trained_names: list[str], device) -> None:
    tensors = load_file(str(Path(checkpoint) / "ema.safetensors"))
    keys = [str(i) for i in range(len(tensors))] if "0" in tensors else trained_names  # older: by position
    ema.load_state_dict({**ema_state, "shadow_params": [tensors[k] for k in keys]})
    ema.to(device)


def has_discriminator(checkpoint: Path) -> bool:
    return any((Path(checkpoint) / name).is_file() for name in ("model_1.safetensors", "pytorch_model_1.bin"))


def load_checkpoint_vae(run: Path, use_ema: bool | None = None):
    """The VAE of a run folder's newest verified checkpoint (its EMA weights when the run exports EMA): what
    `vae/` would hold, for a run that was interrupted before its export."""
    try:
        checkpoint = find_checkpoint(run, "latest")
    except FileNotFoundError:
        raise FileNotFoundError(f"{run} is an sdvae run folder without its export (vae/) and without a complete "
                                f"checkpoint to take the VAE from") from None
    config_file = checkpoint / "vae_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{checkpoint} has no vae_config.json (written by sdvae 0.1.1 and later): "
                                f"resume the run to let it export")
    config = check_config(read_config_json(config_file), config_file)
    vae = vae_class(config).from_config(config)
    weights = read_state_dict(checkpoint / "model.safetensors")
    load_strict(vae, {k[4:]: v for k, v in weights.items() if k.startswith("vae.")}, checkpoint / "model.safetensors")
    if use_ema is None:
        config = _run_config(run)
        use_ema = config.get("export_ema", True) and (checkpoint / "ema.safetensors").is_file()
    if use_ema:
        ema = read_state_dict(checkpoint / "ema.safetensors")
        parameters = dict(vae.named_parameters())
        with torch.no_grad():
            for name, tensor in ema.items():
                parameters[name].copy_(tensor)
    log.warning("%s has no vae/ export yet: using %s (%s weights)", run, checkpoint, "EMA" if use_ema else "trained")
    return vae


def _run_config(run: Path) -> dict:
    try:  # the run's own settings; a damaged one only loses the export_ema preference
        return read_config_file(Path(run) / "config.yaml")
    except (OSError, ValueError):
        return {}
