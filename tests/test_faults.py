"""Training runs meet the faults of long runs: Ctrl-C / SIGTERM, non-finite updates, a second run in the same folder,
damaged checkpoints, full disks, kills while pruning. Nothing is lost and nothing broken is called a success."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdvae.checkpoints import CheckpointError, checkpoint_problem, completed_checkpoints, find_checkpoint
from sdvae.cli import main
from sdvae.files import FolderLock, FolderLocked
from sdvae.train import train
from tests.conftest import write_photos
from tests.test_train import config

COMMON = ["resolution=32", "perceptual_weight=0", "learning_rate=1e-3", "adam_beta1=0.9", "adam_beta2=0.99",
          "checkpoint_every=2", "log_every=1", "batch_size=2", "ema_decay=0.9", "preview_images=0"]
SDVAE = [sys.executable, "-m", "sdvae", "train"]


def weights(folder: Path) -> dict:
    return load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")


def wait_for(path: Path, proc, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 12-step run: what every interrupted and resumed run must equal bit for bit."""
    root = tmp_path_factory.mktemp("straight")
    data = write_photos(root / "photos", size=48)
    out = subprocess.run([*SDVAE, *COMMON, f"data={data}", "max_steps=12", "num_workers=0",
                          f"output_dir={root / 'run'}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return data, weights(root / "run")


@pytest.mark.slow
@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, 1), (signal.SIGTERM, 0)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_resume_is_exact(tmp_path, straight, sig, workers):
    """Sent to the whole process group, as a terminal's Ctrl-C is (loader workers included)."""
    data, expected = straight
    run = tmp_path / "run"
    proc = subprocess.Popen([*SDVAE, *COMMON, f"data={data}", "max_steps=1000", f"num_workers={workers}",
                             f"output_dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(run / "checkpoint-2" / "trainer_state.json", proc)
    sent = time.time()
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr and time.time() - sent < 60
    step = json.loads((completed_checkpoints(run)[-1] / "trainer_state.json").read_text())["step"]
    assert 2 <= step < 12 and f"checkpoint-{step}" in stderr.strip().splitlines()[-1]
    assert not (run / "vae").exists() and checkpoint_problem(run / f"checkpoint-{step}") is None
    resume = f"--config {run / 'config.yaml'} --resume latest"
    assert resume in stderr  # the exact command to continue
    out = subprocess.run([*SDVAE, *resume.split(), "max_steps=12"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = weights(run)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def infinite_learning_rate(cfg):
    """An update that overflows: inf is refused when settings are read, so it is set on a config already checked."""
    cfg.learning_rate = float("inf")
    return cfg


def test_an_infinite_learning_rate_never_writes_a_model(tmp_path, photos):
    cfg = infinite_learning_rate(config(tmp_path, photos, max_steps=1, max_nonfinite_steps=3))
    with pytest.raises(RuntimeError, match="Last good checkpoint: none written yet"):
        train(cfg)
    assert not (tmp_path / "run" / "vae").exists() and not completed_checkpoints(tmp_path / "run")


def test_updates_that_make_weights_non_finite_are_undone_and_counted(tmp_path, photos):
    train(config(tmp_path, photos, max_steps=3, ema_decay=0.9))
    run = tmp_path / "run"
    (run / "vae").rename(tmp_path / "good-vae")
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row.*update.*checkpoint-3"):
        train(infinite_learning_rate(config(tmp_path, photos, max_steps=6, max_nonfinite_steps=3, resume="latest",
                                            ema_decay=0.9)))
    assert [p.name for p in completed_checkpoints(run)] == ["checkpoint-3"] and not (run / "vae").exists()
    assert all(torch.isfinite(w).all() for w in load_file(run / "checkpoint-3" / "model.safetensors").values())


def test_export_and_convert_refuse_non_finite_weights(tmp_path, vae_dir, capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    vae.save_pretrained(tmp_path / "nan-vae")
    for argv in (["export", str(tmp_path / "nan-vae"), "--out", str(tmp_path / "out")],
                 ["export", str(tmp_path / "nan-vae"), "--format", "single-file", "--out", str(tmp_path / "v.safetensors")],
                 ["convert", str(tmp_path / "nan-vae"), str(tmp_path / "c.safetensors")]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1 and "decoder.conv_out.weight" in err and "non-finite" in err
        assert "fp16" not in out + err
    assert not any(p.exists() for p in (tmp_path / "out", tmp_path / "v.safetensors", tmp_path / "c.safetensors"))


@pytest.mark.slow
def test_a_second_run_in_a_locked_folder_fails_at_once_naming_the_holder(tmp_path, photos, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([*SDVAE, *COMMON, f"data={photos}", "max_steps=1000", "num_workers=0",
                               f"output_dir={run}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(run / "checkpoint-2" / "trainer_state.json", holder)
        started = time.time()
        assert main(["train", f"data={photos}", f"output_dir={run}", "max_steps=2", "resolution=32",
                     "perceptual_weight=0", "num_workers=0"]) == 2
        assert time.time() - started < 30
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and "in use" in err
        assert (run / "checkpoint-2").is_dir()  # the second run touched nothing
    finally:
        holder.kill()  # kill -9: the OS drops its lock
        holder.wait()
    metrics = train(config(tmp_path, photos, max_steps=2, checkpoint_every=1))
    assert metrics["steps"] == 2


def test_the_lock_is_held_for_the_whole_run_and_released_after(tmp_path, photos):
    with FolderLock(tmp_path / "run"):
        with pytest.raises(FolderLocked, match=f"pid {os.getpid()}"):
            train(config(tmp_path, photos, max_steps=1))
    assert train(config(tmp_path, photos, max_steps=1))["steps"] == 1
    FolderLock(tmp_path / "run").acquire().release()  # train released it


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_passed_over_with_a_warning(tmp_path, photos, caplog):
    train(config(tmp_path, photos, max_steps=6))
    run = tmp_path / "run"
    model = run / "checkpoint-6" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a truncated copy
    assert find_checkpoint(run, "latest") == run / "checkpoint-3"
    assert "checkpoint-6" in caplog.text and "damaged" in caplog.text
    with pytest.raises(CheckpointError, match="model.safetensors"):
        find_checkpoint(run, str(run / "checkpoint-6"))
    metrics = train(config(tmp_path, photos, max_steps=9, resume="latest"))
    assert metrics["steps"] == 9 and (run / "superseded-checkpoint-6").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["optimizer.bin", "random_states_0.pkl", "trainer_state.json"])
def test_every_damaged_checkpoint_file_is_named(tmp_path, photos, damage):
    train(config(tmp_path, photos, max_steps=3))
    path = tmp_path / "run" / "checkpoint-3" / damage
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=damage):
        find_checkpoint(tmp_path / "run", str(path.parent))


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A tmpfs of the given size where one can be mounted (root); elsewhere a writer that fails with ENOSPC once
    that many bytes would be on the disk."""
    mounted = []

    def make(size: int) -> Path:
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                          capture_output=True).returncode == 0:
            mounted.append(disk)
            return disk
        import sdvae.files

        real = sdvae.files.fsync_tree

        def full_disk(folder):
            used = sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
            if used > size:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(folder)
        monkeypatch.setattr(sdvae.files, "fsync_tree", full_disk)
        return disk
    yield make
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


def checkpoint_bytes() -> int:
    from sdvae.models import build_vae

    return 12 * sum(p.numel() for p in build_vae("tiny").parameters())  # weights + Adam's two moments, fp32


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, photos, small_disk):
    disk = small_disk(int(checkpoint_bytes() * 1.5))  # room for one checkpoint, not two
    with pytest.raises(RuntimeError) as failure:
        train(config(tmp_path, photos, output_dir=str(disk / "run"), max_steps=4, checkpoint_every=2,
                     preview_images=0))
    message = str(failure.value)
    assert message.startswith("no space left on device while writing checkpoint-4") and "\n" not in message
    assert f"{disk / 'run' / 'checkpoint-2'} is intact" in message
    assert sorted(p.name for p in (disk / "run").iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert checkpoint_problem(disk / "run" / "checkpoint-2") is None


@pytest.mark.slow
def test_a_full_disk_during_the_export_leaves_no_partial_vae(tmp_path, photos, small_disk, capsys):
    disk = small_disk(int(checkpoint_bytes() * 7 / 6))  # the checkpoint fits, the export (a third of it) does not
    run = disk / "run"
    assert main(["train", f"data={photos}", f"output_dir={run}", "max_steps=2", "checkpoint_every=2",
                 "resolution=32", "batch_size=2", "perceptual_weight=0", "num_workers=0", "preview_images=0"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err and line.startswith("sdvae train: error: no space left on device while writing "
                                                      f"the export {run / 'vae'};"), err
    assert "checkpoint-2 is intact" in line and f"sdvae export {run}" in line
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(("logs", "samples"))) == [
        ".sdvae.lock", "checkpoint-2", "config.yaml"]


@pytest.mark.slow
def test_a_kill_while_pruning_never_leaves_a_complete_looking_checkpoint(tmp_path, photos, monkeypatch):
    import shutil

    import sdvae.files

    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else []
        if any(p.name == "model.safetensors" for p in files):
            next(p for p in files if p.name == "model.safetensors").unlink()
            raise SystemExit(137)  # the process dies here
        real_rmtree(path, ignore_errors=ignore_errors)
    monkeypatch.setattr(sdvae.files.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        train(config(tmp_path, photos, max_steps=6, checkpoint_every=2, checkpoints_total_limit=1))
    run = tmp_path / "run"
    assert [p.name for p in completed_checkpoints(run)] == ["checkpoint-4"]
    assert all(checkpoint_problem(p) is None for p in completed_checkpoints(run))
    monkeypatch.setattr(sdvae.files.shutil, "rmtree", real_rmtree)
    train(config(tmp_path, photos, max_steps=6, checkpoint_every=2, checkpoints_total_limit=1, resume="latest"))
    assert not list(run.glob(".deleting-*")) and [p.name for p in completed_checkpoints(run)] == ["checkpoint-6"]


def test_resuming_at_or_past_max_steps_leaves_the_run_as_it_is(tmp_path, photos, capsys):
    train(config(tmp_path, photos, max_steps=3))
    metrics = (tmp_path / "run" / "metrics.json").read_bytes()
    assert train(config(tmp_path, photos, max_steps=3, resume="latest")) == {}
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.json").read_bytes() == metrics


@pytest.mark.slow
def test_a_discriminator_added_at_resume_starts_fresh(tmp_path, photos):
    train(config(tmp_path, photos, max_steps=3))
    metrics = train(config(tmp_path, photos, max_steps=5, resume="latest", disc_weight=0.5, disc_start=0))
    assert metrics["steps"] == 5 and metrics["discriminator"] and "d_loss" in metrics["last_logged"]


def test_export_of_a_run_without_its_vae_uses_the_newest_checkpoint(tmp_path, photos, capsys):
    train(config(tmp_path, photos, max_steps=3, ema_decay=0.9))
    run = tmp_path / "run"
    expected = weights(run)  # the EMA weights, as the run exported them
    (run / "vae").rename(tmp_path / "old-vae")
    assert main(["export", str(run), "--out", str(tmp_path / "exported"), "--no-fp16-check"]) == 0
    exported = load_file(tmp_path / "exported" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)


def test_stale_temporaries_of_killed_runs_are_removed_at_start(tmp_path, photos, capsys):
    run = tmp_path / "run"
    for stale in (".checkpoint-9.tmp", ".vae.tmp", ".deleting-checkpoint-1"):
        (run / stale).mkdir(parents=True)
        (run / stale / "model.safetensors").write_bytes(b"partial")
    (run / ".metrics.json.tmp").write_text("{")
    train(config(tmp_path, photos, max_steps=1, checkpoint_every=1))
    assert not list(run.glob(".*tmp")) and not list(run.glob(".deleting-*"))
    assert ".checkpoint-9.tmp" in capsys.readouterr().out


@pytest.mark.slow
def test_under_several_processes_a_signal_stops_all_of_them_on_the_same_step(tmp_path):
    from tests.test_processes import ACCELERATE

    data = write_photos(tmp_path / "photos", size=48)
    run = tmp_path / "run"
    proc = subprocess.Popen([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdvae", "train", *COMMON,
                             f"data={data}", "max_steps=1000", "num_workers=0", f"output_dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(run / "checkpoint-2" / "trainer_state.json", proc)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C; the launcher forwards it again
    _, stderr = proc.communicate(timeout=120)
    newest = completed_checkpoints(run)[-1]
    step = json.loads((newest / "trainer_state.json").read_text())["step"]
    stopped = [line for line in stderr.splitlines() if "stopped at step" in line]
    assert stopped == [f"sdvae train: SIGINT: stopped at step {step} with a checkpoint in {newest}; continue with: "
                       f"accelerate launch --num_processes 2 -m sdvae train --config {run / 'config.yaml'} "
                       f"--resume latest"], stderr[-3000:]
    assert {p.name for p in newest.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert checkpoint_problem(newest) is None and not list(run.glob(".*.tmp"))


def test_the_step_guard_undoes_weights_and_optimiser_state_exactly():
    from sdvae.safety import StepGuard

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64))
    optimizer = torch.optim.Adam([weight], lr=1e-2)
    guard = StepGuard([weight], [optimizer])
    for step in range(2):  # the first step creates Adam's state: undoing it must remove that state again
        before = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
        weight.grad = torch.randn(64)
        guard.save()
        optimizer.param_groups[0]["lr"] = float("inf")
        optimizer.step()
        assert not guard.finite()
        guard.restore()
        assert torch.equal(weight, before[0]) and optimizer.state[weight].keys() == before[1].keys()
        assert all(torch.equal(optimizer.state[weight][k], v) for k, v in before[1].items())
        optimizer.param_groups[0]["lr"] = 1e-2
        optimizer.step()  # a good step, so that the second round starts with state
    with torch.no_grad():
        weight[0] = 1e30  # finite, though its 2-norm overflows: still finite
    assert guard.finite()


@pytest.mark.slow
def test_non_finite_weights_are_refused_at_resume_and_as_init_from(tmp_path, photos, vae_dir):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    train(config(tmp_path, photos, max_steps=3))
    model = tmp_path / "run" / "checkpoint-3" / "model.safetensors"
    state = load_file(model)
    state["vae.decoder.conv_in.weight"][0] = float("nan")
    save_file(state, model, metadata={"format": "pt"})  # well-formed, same size: only its values are wrong
    with pytest.raises(CheckpointError, match="checkpoint-3.*NaN"):
        train(config(tmp_path, photos, max_steps=6, resume="latest"))
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        vae.encoder.conv_in.bias[0] = float("inf")
    vae.save_pretrained(tmp_path / "inf-vae")
    with pytest.raises(ValueError, match="encoder.conv_in.bias"):
        train(config(tmp_path, photos, max_steps=1, init_from=str(tmp_path / "inf-vae"), output_dir=str(tmp_path / "b")))


@pytest.mark.slow
def test_a_damaged_checkpoint_vae_config_is_one_line_naming_it(tmp_path, photos, capsys):
    train(config(tmp_path, photos, max_steps=3))
    run = tmp_path / "run"
    (run / "vae").rename(tmp_path / "old-vae")
    config_file = run / "checkpoint-3" / "vae_config.json"
    config_file.write_text("{" * config_file.stat().st_size)  # same size: only its content is wrong
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "vae_config.json" in err and "not valid JSON" in err and not (tmp_path / "exported").exists()
