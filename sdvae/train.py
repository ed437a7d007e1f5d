"""The training loop, CPU to many GPUs through Accelerate. `train()` reads top to bottom; the pieces it calls
(build_run, batches, train_step, finish) follow it in that order.

    sdvae train --config train/configs/tiny.yaml data=/path/to/images
    accelerate launch -m sdvae train --config train/configs/sd-kl-f8.yaml data=...
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .checkpoints import (CheckpointError, TrainState, find_checkpoint, has_discriminator, last_good, load_ema,
                          save_checkpoint, set_aside_later_checkpoints)
from .config import TrainConfig, save_config
from .data import build_dataset, collate, seed_for
from .discriminator import NLayerDiscriminator, discriminator_term, generator_term
from .downloads import VGG16_URL, weights_file
from .equivariance import Equivariance
from .errors import TrainingInterrupted
from .export import save_diffusers
from .files import (STALE_PATTERNS, FolderLock, FolderLocked, ForeignOutput, atomic_json, atomic_write,
                    refuse_foreign_output, remove_stale_temporaries, write_failure)
from .images import png_bytes
from .latents import latent_statistics
from .losses import TRAIN_HINT, AutoencoderLoss, build_lpips
from .metrics import reconstruct, score, summarise
from .models import last_decoder_layer, teacher_latents, training_module
from .pictures import comparison_grid, error_figure
from .processes import all_processes_agree, several_processes_without_gpu
from .progress import LogWindow, advance, report_skipped, write_log
from .safety import StepGuard, StopSignals, count_nonfinite, ignore_stop_signals, nonfinite_problem
from .weights import cpu_has_fast_16bit

log = logging.getLogger("sdvae")


def train(cfg: TrainConfig) -> dict:
    """Train to max_steps (or max_minutes), checkpointing on the way, then export; returns metrics.json's content."""
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.seed)  # model init; crops and posterior noise are seeded per (process, epoch, step)
    with lock_run_folder(accelerator, out), StopSignals(accelerator.is_main_process) as signals:
        try:
            run = build_run(cfg, accelerator)
            state, main = run.state, accelerator.is_main_process
            if state.step >= cfg.max_steps or out_of_time(cfg, state):
                return nothing_to_do(run)
            start_run_folder(run)
            at_start = validate(run.vae, run.val_batches, accelerator.device) if (
                run.val_batches and main and not cfg.resume) else None  # the baseline of the final scores
            window, micro_batches = LogWindow(), readable_batches(run)
            stop, signum, trained_before = False, 0, state.train_seconds
            with tqdm(total=cfg.max_steps, initial=state.step, disable=not main, desc="train", unit="step") as progress:
                while not stop:
                    result = train_step(run, micro_batches)
                    if result is None:
                        continue  # skipped and counted: a non-finite loss, gradient or update
                    window.add(*result)
                    state.step += 1
                    state.train_seconds = trained_before + time.time() - window.started
                    if run.ema is not None:
                        run.ema.step(run.trained)
                    stop, signum = stop_reason(run, signals)
                    advance(progress, cfg, state, window.started, stop, signum)
                    if state.step % cfg.log_every == 0 or stop:
                        write_log(run, window, progress)
                    if run.preview is not None and main and (state.step % cfg.sample_every == 0 or stop):
                        write_preview(run)
                    if state.step % cfg.checkpoint_every == 0 or stop:
                        save_checkpoint(accelerator, out, state, cfg.checkpoints_total_limit, run.vae, run.ema,
                                        run.trained_names)
            if signum:
                raise interrupted(run, signum)
            return finish(run, window, at_start)
        finally:
            accelerator.end_training()


def check_weights_files(cfg: TrainConfig) -> None:
    """The LPIPS trunk's weights: found (or downloaded, with a network) now, or one error that says how to get them."""
    if cfg.perceptual_weight > 0:
        weights_file(VGG16_URL, cfg.lpips_vgg_weights, True, "VGG16 ImageNet weights for LPIPS (perceptual_weight > 0)",
                     TRAIN_HINT.format(name=Path(VGG16_URL).name) + " (with a network: sdvae fetch-weights)")


def make_accelerator(cfg: TrainConfig, out: Path) -> Accelerator:
    if cfg.mixed_precision != "no" and not torch.cuda.is_available() and not cpu_has_fast_16bit():
        warnings.warn(f"mixed_precision={cfg.mixed_precision} on this CPU ({torch.backends.cpu.get_cpu_capability()}, "
                      f"no native 16-bit arithmetic) is many times slower than fp32: set mixed_precision=no here")
    return Accelerator(
        cpu=several_processes_without_gpu(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # every process must draw the same permutation and take its own shard of it
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )


@contextlib.contextmanager
def lock_run_folder(accelerator, out: Path):
    """One run per folder: the main process holds the lock; if it cannot get it, every process stops."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:  # a folder that holds what sdvae did not write (a pipeline's, a repo clone) is never trained into
            if not left_by_a_run(out):
                refuse_foreign_output(out, overwrite=False, whole=False, remedy="choose a new or empty output_dir")
            lock = FolderLock(out, "training run").acquire()
        except (FolderLocked, ForeignOutput) as e:
            error = e
    if not all_processes_agree(accelerator, error is None):
        raise error or FolderLocked(f"{out} is in use by another sdvae training run")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def left_by_a_run(out: Path) -> bool:
    """A folder of a run older than its lock file (a checkpoint), or only what a killed run leaves."""
    if any(out.glob("checkpoint-*/trainer_state.json")):
        return True
    entries = list(out.iterdir()) if out.is_dir() else []
    return bool(entries) and all(any(p.match(pattern) for pattern in STALE_PATTERNS) for p in entries)


@dataclass
class Run:
    """What a training step needs, prepared by Accelerate; built once by build_run."""
    cfg: TrainConfig
    accelerator: Accelerator
    out: Path
    model: torch.nn.Module  # VAETrainingForward (DistillationForward) wrapped for DDP: every forward goes through it
    vae: torch.nn.Module  # its AutoencoderKL (AutoencoderTiny), unwrapped: export, previews, the adversarial weight
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: AutoencoderLoss
    params: list  # what the optimiser updates (with the learned log-variance)
    trained_names: list  # the VAE's trained parameters (EMA, checkpoints); a frozen encoder is not among them
    state: TrainState
    guard: "StepGuard"
    disc: torch.nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    ema: EMAModel | None = None
    preview: torch.Tensor | None = None
    val_batches: list = field(default_factory=list)
    perceptual: bool = False
    equivariance: Equivariance | None = None  # None: the term is off
    teacher: torch.nn.Module | None = None  # distillation: the frozen KL VAE whose latents the student learns
    reference: torch.nn.Module | None = None  # output_reference: the frozen VAE whose decode is the target

    @functools.cached_property
    def trained(self) -> list:
        parameters = dict(self.vae.named_parameters())
        return [parameters[n] for n in self.trained_names]


def build_run(cfg: TrainConfig, accelerator) -> Run:
    # Data first: a missing or empty dataset must fail before any model is built.
    dataset = build_dataset(cfg.data, cfg.resolution, cfg.image_column, cfg.data_split, cfg.streaming,
                            cfg.random_flip, seed=cfg.seed, max_pixels=cfg.max_pixels)
    dataset.transform.downscale_max = cfg.crop_downscale_max
    check_weights_files(cfg)  # before loader workers and models: a missing file is one line, not a failure minutes in
    workers = loader_workers(cfg, accelerator)
    if workers == 0 and hasattr(dataset, "keep_decoded"):
        dataset.keep_decoded(cfg.image_cache_mb)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=not isinstance(dataset, IterableDataset),
                        num_workers=workers, collate_fn=collate, drop_last=False, worker_init_fn=ignore_stop_signals)
    preview, val_batches = load_validation(cfg, dataset)
    module, teacher, reference = training_module(cfg, accelerator.device)
    lpips_model = build_lpips(cfg.lpips_vgg_weights) if cfg.perceptual_weight > 0 else None
    criterion = AutoencoderLoss(cfg.rec_loss, cfg.perceptual_weight, cfg.kl_weight, lpips_model,
                                cfg.equivariance_weight, cfg.latent_weight).to(accelerator.device)
    params = [p for p in module.parameters() if p.requires_grad]  # logvar included when learned
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(parameter_groups(params, cfg.relative_lr), lr=learning_rate(cfg, accelerator, 0), betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay, amsgrad=cfg.adam_amsgrad,  # lr: the warm-up's first
                                fused=accelerator.device.type == "cuda" or None)  # one kernel; slower on CPUs
    model, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    checkpoint = find_checkpoint(Path(cfg.output_dir), cfg.resume) if cfg.resume else None
    late_disc = checkpoint is not None and cfg.disc_weight > 0 and not has_discriminator(checkpoint)
    if late_disc:  # loaded before the discriminator is registered, which then starts fresh
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"{checkpoint} was trained without a discriminator: it starts now, freshly initialised")
    disc = disc_optimizer = None
    if cfg.disc_weight > 0:
        disc = build_discriminator(cfg, accelerator)
        disc_rate = (cfg.disc_learning_rate or cfg.learning_rate) * lr_scale(cfg, accelerator)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=disc_rate, betas=(0.5, 0.9))
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    if checkpoint is not None and not late_disc:
        accelerator.load_state(str(checkpoint))
    state = TrainState.read(checkpoint) if checkpoint is not None else TrainState()
    vae = accelerator.unwrap_model(model).vae
    trained_names = [n for n, p in vae.named_parameters() if p.requires_grad]
    guarded = params + (list(disc.parameters()) if disc is not None else [])
    run = Run(cfg, accelerator, Path(cfg.output_dir), model, vae, optimizer, loader, criterion, params, trained_names,
              state, StepGuard(guarded, [optimizer] + ([disc_optimizer] if disc is not None else [])), disc,
              disc_optimizer, preview=preview, val_batches=val_batches, perceptual=lpips_model is not None,
              equivariance=Equivariance(cfg.equivariance_prob, cfg.equivariance_scales, cfg.equivariance_rotate)
              if cfg.equivariance_weight > 0 else None, teacher=teacher, reference=reference)
    if checkpoint is not None:
        if not run.guard.finite():  # written by something other than this loop, which never saves such weights
            raise CheckpointError(f"cannot resume from {checkpoint}: its weights hold NaN or inf")
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    if cfg.ema_decay > 0:  # over the trained parameters only: a frozen encoder stays bit-identical
        # made after the resume, so EMA turned on at resume averages from the resumed weights
        run.ema = EMAModel(run.trained, decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup)
        run.ema.to(accelerator.device)
        if state.ema is not None:
            load_ema(run.ema, checkpoint, state.ema, trained_names, accelerator.device)
    return run


def loader_workers(cfg: TrainConfig, accelerator) -> int:
    """On the CPU, loader processes take cores from the compute threads; on a GPU they decode while it computes.
    A preset's workers (8, for a GPU machine) are capped to the CPUs this process has."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    cpus = max(1, (os.cpu_count() or 1) // processes_here)
    if cfg.num_workers is not None:
        if cfg.num_workers > cpus and accelerator.is_main_process:
            log.warning("num_workers=%d capped to %d: the CPUs this process has", cfg.num_workers, cpus)
        return min(cfg.num_workers, cpus)
    if accelerator.device.type == "cpu":
        return 0
    return max(1, min(8, cpus - 1))


def parameter_groups(params: list, relative: bool) -> list[dict]:
    """One group, or with relative_lr one per tensor whose rate is scaled by the tensor's RMS now (1 for an all-zero
    tensor). The scale is kept in the optimiser's state, so a resumed run keeps the first session's."""
    if not relative:
        return [dict(params=params, lr_scale=1.0)]
    return [dict(params=[p], lr_scale=float(p.detach().float().square().mean().sqrt()) or 1.0) for p in params]


def lr_scale(cfg: TrainConfig, accelerator) -> int:
    """LDM: base rate x processes x batch x accumulation, for the autoencoder and the discriminator alike."""
    if not cfg.scale_lr:
        return 1
    return accelerator.num_processes * cfg.batch_size * cfg.gradient_accumulation_steps


def learning_rate(cfg: TrainConfig, accelerator, step: int, progress: float = 0.0) -> float:
    """Linear warm-up, then constant or a cosine down to lr_min_ratio x the rate at progress 1 (see run_progress).
    A function of the step alone when the run is limited by max_steps, so that a resumed run continues exactly."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    decay = 1.0
    if cfg.lr_schedule == "cosine":
        decay = cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.learning_rate * lr_scale(cfg, accelerator) * warm * decay


def run_progress(cfg: TrainConfig, state: TrainState) -> float:
    """How far the run is towards its end, 0 to 1: by steps, or by time when max_minutes will end it first."""
    by_time = state.train_seconds / (cfg.max_minutes * 60) if cfg.max_minutes > 0 else 0.0
    return min(1.0, max(state.step / cfg.max_steps, by_time))


def nothing_to_do(run: Run) -> dict:
    export, state, cfg = run.out / "vae", run.state, run.cfg
    hint = "" if export.is_dir() else f"; export it with: sdvae export {run.out} --out {export}"
    if state.step >= cfg.max_steps:
        where, limit = f"is at step {state.step} and max_steps is {cfg.max_steps}", "max_steps"
    else:
        where = f"has trained {state.train_seconds / 60:.1f} minutes and max_minutes is {cfg.max_minutes:g}"
        limit = "max_minutes"
    run.accelerator.print(f"the checkpoint {where}: nothing to do, {run.out} is left as it is (raise {limit} to "
                          f"train on){hint}")
    return {}


def start_run_folder(run: Run) -> None:
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    if accelerator.is_main_process:  # under the lock: what is left over is from runs that were killed
        for stale in remove_stale_temporaries(out):
            accelerator.print(f"removed {stale}, left by a run that was killed while writing it")
        set_aside_later_checkpoints(out, run.state.step, accelerator.print)  # an old timeline's: not mixed in
        (out / "samples").mkdir(exist_ok=True)
        save_config(cfg, out / "config.yaml")
    # TensorBoard's hyper-parameters take numbers and strings only
    accelerator.init_trackers("sdvae", config={k: "" if v is None else str(list(v)) if isinstance(v, tuple) else v
                                               for k, v in dataclasses.asdict(cfg).items()})
    if not run.perceptual:
        accelerator.print("perceptual loss: off (perceptual_weight=0)")


def readable_batches(run: Run):
    """The readable micro-batches from where the run stands, epoch after epoch, for ever. Files that cannot be
    read are named (up to skip_log_limit) and counted; a whole epoch without one readable image is an error."""
    state, accelerator = run.state, run.accelerator
    while True:
        run.loader.set_epoch(state.epoch)
        resumed_within = state.batch_in_epoch  # skip what this epoch already trained on
        epoch = accelerator.skip_first_batches(run.loader, resumed_within) if resumed_within else run.loader
        readable = False
        for batch in epoch:
            state.batch_in_epoch += 1
            report_skipped(batch["skipped"], state.skipped, run.cfg.skip_log_limit)
            # a batch of nothing but unreadable files: DDP needs every process to skip it together
            if all_processes_agree(accelerator, batch["pixel_values"].numel() > 0):
                readable = True
                yield batch["pixel_values"]
        if not resumed_within and not readable:  # else the next epoch would be as empty, for ever
            raise ValueError(f"none of the {len(state.skipped)} images in {run.cfg.data} could be read (see the "
                             f"warnings above for why)")
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def train_step(run: Run, micro_batches) -> tuple[list, int] | None:
    """One optimiser step over one accumulation window: (the micro-batches' logs, images), or None when the
    step was skipped: a non-finite loss or gradient, or an update that left a weight non-finite (undone)."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    use_disc = run.disc is not None and state.step >= cfg.disc_start  # before disc_start it costs nothing
    rate = learning_rate(cfg, accelerator, state.step, run_progress(cfg, state))
    for group in run.optimizer.param_groups:  # set here, not after the step: a resume may change the rate
        group["lr"] = rate * group.get("lr_scale", 1.0)
    window, images, losses = [], 0, []
    for x in micro_batches:
        with accelerator.accumulate(run.model, *([run.disc] if run.disc is not None else [])):
            loss, logs, reconstruction = vae_backward(run, x, use_disc)
            losses.append(loss.detach())
            if use_disc:
                d_loss, d_logs = discriminator_term(run.disc, x, reconstruction, cfg.disc_loss)
                accelerator.backward(d_loss)
                logs.update(d_logs)
        window.append(logs)
        images += x.shape[0] * accelerator.num_processes
        if accelerator.sync_gradients:
            break
    # the norm is logged also when clipping is off
    window[-1]["grad_norm"] = grad_norm = accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm or math.inf)
    problem = nonfinite_problem(accelerator, losses, grad_norm)
    if problem is None:
        run.guard.save()
        run.optimizer.step()
        if use_disc:
            run.disc_optimizer.step()
        if not all_processes_agree(accelerator, run.guard.finite()):
            run.guard.restore()
            problem = "update (the weights it made were non-finite; undone)"
    run.optimizer.zero_grad(set_to_none=True)
    if run.disc is not None:
        run.disc_optimizer.zero_grad(set_to_none=True)
    return count_nonfinite(run, problem) if problem else (window, images)


def vae_backward(run: Run, x: torch.Tensor, use_disc: bool):
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    noise_seed = seed_for(cfg.seed, accelerator.process_index, state.step, state.batch_in_epoch, state.epoch)
    if run.teacher is not None:
        target, given = teacher_latents(run.teacher, x, noise_seed if cfg.sample_posterior else None)
        outputs = run.model(x, target, given)
    else:
        outputs = run.model(x, noise_seed if cfg.sample_posterior else None, equivariance_transform(run, x, noise_seed),
                            run.reference)
    reconstruction = outputs.reconstruction
    target = x if outputs.target is None else outputs.target  # output_reference: the reference's decode
    with accelerator.autocast():
        loss, nll, logs = run.criterion(target, reconstruction, outputs.kl, outputs.logvar, outputs.equivariant,
                                        outputs.latent_error)
        logs.update(outputs.latent_logs)
        if outputs.activation_penalty is not None:
            loss = loss + cfg.activation_weight * outputs.activation_penalty
            logs["activation_penalty"] = outputs.activation_penalty.detach()
        if use_disc:
            adversarial, adv_logs = generator_term(accelerator.unwrap_model(run.disc), reconstruction, nll,
                                                   last_decoder_layer(run.vae), cfg.disc_weight)
            loss = loss + adversarial
            logs.update(adv_logs)
    accelerator.backward(loss)  # also when not finite: DDP expects every forward to get its backward
    return loss, logs, reconstruction


def equivariance_transform(run: Run, x: torch.Tensor, noise_seed: int):
    """This step's T, or None: drawn from the step's seed too, so a resumed run draws the same transforms."""
    if run.equivariance is None:
        return None
    factor = 2 ** (len(run.vae.config.block_out_channels) - 1)
    return run.equivariance.draw(seed_for(noise_seed, 1), (x.shape[-2] // factor, x.shape[-1] // factor))


def stop_reason(run: Run, signals: StopSignals) -> tuple[bool, int]:
    """(stop after this step, the signal that asked for it or 0), the same on every process."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    signum = signals.signum
    if accelerator.num_processes > 1:  # one clock for all (the latest), so the stop and the rate agree everywhere
        flags = accelerator.gather(torch.tensor([[signum, state.train_seconds]], dtype=torch.float64,
                                                device=accelerator.device))
        signum, state.train_seconds = int(flags[:, 0].max()), float(flags[:, 1].max())
    return bool(signum or out_of_time(cfg, state) or state.step >= cfg.max_steps), signum


def out_of_time(cfg: TrainConfig, state: TrainState) -> bool:
    return 0 < cfg.max_minutes * 60 <= state.train_seconds


def interrupted(run: Run, signum: int) -> TrainingInterrupted:
    several = run.accelerator.num_processes > 1
    launcher = f"accelerate launch --num_processes {run.accelerator.num_processes} -m sdvae" if several else "sdvae"
    return TrainingInterrupted(
        f"{signal.Signals(signum).name}: stopped at step {run.state.step} with a checkpoint in "
        f"{run.out / f'checkpoint-{run.state.step}'}; continue with: {launcher} train --config "
        f"{run.out / 'config.yaml'} --resume latest", 128 + signum, run.accelerator.is_main_process)


def finish(run: Run, window: LogWindow, at_start: dict | None) -> dict:
    """Export (the EMA weights when kept), score the held-out images with them, write metrics.json."""
    cfg, accelerator, vae, out = run.cfg, run.accelerator, run.vae, run.out
    elapsed = time.time() - window.started
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    exported = "trained"
    if run.ema is not None and cfg.export_ema:
        run.ema.copy_to(run.trained)
        exported = "ema"
    factors = measure_factors(run)
    with reported_write(f"the export {out / 'vae'}", out):
        save_diffusers(vae, out / "vae", overwrite=True)  # the run folder is this run's (lock_run_folder)
    state = run.state
    metrics = dict(steps=state.step, epochs=state.epoch, wall_seconds=round(elapsed, 1),
                   images_per_sec=round(window.images_seen / max(elapsed, 1e-9), 2), images_seen=window.images_seen,
                   skipped_files=len(state.skipped), skipped_file_names=sorted(state.skipped)[:1000],
                   nonfinite_steps=state.nonfinite_steps, perceptual_loss=run.perceptual,
                   discriminator=run.disc is not None, exported_weights=exported,
                   processes=accelerator.num_processes, mixed_precision=cfg.mixed_precision,
                   first_logged=window.first, last_logged=window.last, export=str(out / "vae"),
                   model_class=type(vae).__name__, teacher=cfg.teacher,
                   latent_factors=factors)
    if run.val_batches:  # scored with the exported weights
        metrics["validation"] = validate(vae, run.val_batches, accelerator.device)
        if at_start:
            metrics["validation_at_start"] = at_start
    with reported_write("metrics.json and reconstructions.png", out):
        shown = final_examples(run)
        if shown is not None:
            vae.eval()
            with torch.no_grad():
                grid = error_figure(shown, reconstruct(vae, shown.to(accelerator.device)))
            atomic_write(out / "reconstructions.png", png_bytes(grid))
        atomic_json(out / "metrics.json", metrics)
    return metrics


def measure_factors(run: Run) -> dict:
    """A VAE whose encoder trained gets its latents' scaling_factor (and shift_factor where its config has one, the
    SD3 / FLUX convention) measured as `sdvae stats` does, on the first measure_factors_images training images, into
    the config it is exported with. A frozen encoder keeps the source's: its latents must stay valid."""
    cfg, vae = run.cfg, run.vae
    kept = dict(scaling_factor=vae.config.scaling_factor, shift_factor=vae.config.get("shift_factor"))
    wanted = cfg.measure_factors if cfg.measure_factors is not None else not (cfg.train_decoder_only or cfg.teacher)
    why = ("a student decodes its teacher's scaled latents (factors 1 / 0)" if cfg.teacher else
           "measure_factors=false" if not wanted else "the config normalises latents per channel (latents_mean/std)"
           if vae.config.get("latents_mean") is not None else "streamed data" if cfg.streaming else None)
    if why is not None:
        return dict(measured=False, why=why, **kept)
    try:
        stats = latent_statistics(vae, cfg.data, cfg.resolution, cfg.batch_size, cfg.measure_factors_images,
                                  image_column=cfg.image_column, max_pixels=cfg.max_pixels,
                                  split=cfg.data_split)
    except ValueError as e:  # nothing readable left: the run's weights are still exported
        log.warning("latent factors not measured: %s", e)
        return dict(measured=False, why=str(e), **kept)
    written = dict(scaling_factor=stats["scaling_factor"])
    if kept["shift_factor"] is not None:
        written["shift_factor"] = stats["shift_factor"]
    if not all(math.isfinite(v) for v in written.values()):
        raise ValueError(f"the measured latent factors are not finite ({written}); nothing exported")
    vae.register_to_config(**written)
    run.accelerator.print("latent factors measured on {} images: {}".format(
        stats["images"], ", ".join(f"{k} {v:.5g}" for k, v in written.items())))
    return dict(measured=True, previous=kept, **written, **{k: stats[k] for k in (
        "images", "skipped", "resolution", "sampled", "mean", "std", "channel_mean", "channel_std")})


def final_examples(run: Run, count: int = 4) -> torch.Tensor | None:
    """What reconstructions.png shows: `count` held-out images spread over val_data (else the preview's)."""
    if run.preview is None:
        return None
    images = torch.cat(run.val_batches) if run.val_batches else run.preview
    return images[:: max(1, len(images) // count)][:count]


@contextlib.contextmanager
def reported_write(what: str, out: Path):
    """A failed write (a full disk: OSError, torch's RuntimeError, a SafetensorError) as one line that says what
    is still intact and how to export from it."""
    try:
        yield
    except Exception as e:
        raise write_failure(e, what, f"{last_good(out)} (export it with: sdvae export {out} --out "
                                     f"{out / 'vae'})") from None


def load_validation(cfg: TrainConfig, train_dataset):
    """Fixed centre crops: `val_data` is scored with PSNR/SSIM; the preview grids show `preview_images` of them
    (of the first training images when there is no `val_data`)."""
    if cfg.val_data:
        dataset = build_dataset(cfg.val_data, cfg.val_resolution or cfg.resolution, cfg.image_column, cfg.val_split,
                                random_flip=False, random_crop=False, max_pixels=cfg.max_pixels)
    elif isinstance(train_dataset, IterableDataset):
        return None, []
    else:  # the training files, already listed, seen through centre crops
        dataset = train_dataset.centre_cropped()
    if isinstance(dataset, IterableDataset):
        return None, []
    images = []
    for i in range(len(dataset)):
        if len(images) == (cfg.val_max_images if cfg.val_data else cfg.preview_images):
            break
        item = dataset[i]
        if item["pixel_values"] is not None:
            images.append(item["pixel_values"])
    if not images:
        return None, []
    batches = [torch.stack(images[i:i + cfg.batch_size]) for i in range(0, len(images), cfg.batch_size)]
    k = cfg.preview_images
    preview = images[:: max(1, len(images) // k)][:k] if k else []  # spread over the set, not its first files
    return (torch.stack(preview) if preview else None), (batches if cfg.val_data else [])


@torch.no_grad()
def validate(vae, batches, device) -> dict:
    was_training = vae.training
    vae.eval()
    values = {"psnr": [], "ssim": []}
    for x in batches:
        scores = score(x, reconstruct(vae, x.to(device)))
        for k in values:
            values[k] += scores[k]
    vae.train(was_training)
    return summarise(values)


@torch.no_grad()
def write_preview(run: Run) -> None:
    vae, accelerator, step = run.vae, run.accelerator, run.state.step
    vae.eval()
    reconstruction = reconstruct(vae, run.preview.to(accelerator.device))
    vae.train()
    grid = comparison_grid(run.preview, reconstruction)
    try:
        atomic_write(run.out / "samples" / f"step-{step:07d}.png", png_bytes(grid))
    except OSError as e:  # a preview is not worth the run; a full disk is reported by the next checkpoint
        log.warning("preview for step %d not written: %s", step, e)
    psnr = summarise(score(run.preview, reconstruction))["psnr_mean"]
    accelerator.log({"preview/psnr": psnr}, step=step)
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image("preview/input|reconstruction", np.asarray(grid), step, dataformats="HWC")


def build_discriminator(cfg: TrainConfig, accelerator) -> torch.nn.Module:
    several = accelerator.num_processes > 1
    on_cpu = accelerator.device.type == "cpu"
    norm = cfg.disc_norm
    if norm == "auto":  # batch norm as LDM, except where it cannot be synchronised
        norm = "group" if several and on_cpu else "batch"
    if norm == "batch" and several and on_cpu:
        raise ValueError("disc_norm=batch cannot be synchronised across CPU processes; use disc_norm=group")
    disc = NLayerDiscriminator(3, cfg.disc_channels, cfg.disc_layers, norm)
    if cfg.channels_last:
        disc.to(memory_format=torch.channels_last)
    if norm == "batch" and several:
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)  # statistics over the global batch
    return disc


