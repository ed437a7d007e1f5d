"""The training loop: one function, read top to bottom. CPU, one GPU or many, through Accelerate.

    sdvae train --config train/configs/tiny.yaml data=/path/to/images
    accelerate launch -m sdvae train --config train/configs/sd-kl-f8.yaml data=...
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .config import TrainConfig, save_config
from .convert import load_pretrained_vae
from .data import build_dataset, collate, seed_for
from .discriminator import NLayerDiscriminator, discriminator_term, generator_term
from .losses import AutoencoderLoss, build_lpips
from .metrics import comparison_grid, reconstruct, score, summarise
from .models import VAETrainingForward, build_vae

log = logging.getLogger("sdvae")


def several_processes_without_gpu() -> bool:
    """torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: Accelerate forms the gloo group
    only when told it runs on CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def train(cfg: TrainConfig) -> dict:
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=several_processes_without_gpu(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # every process must draw the same permutation and take its own shard of it
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    main = accelerator.is_main_process
    set_seed(cfg.seed)  # model init; crops and posterior noise are seeded per (process, epoch, step)

    # Data first: a missing or empty dataset must fail before any model is built.
    dataset = build_dataset(cfg.data, cfg.resolution, cfg.image_column, cfg.data_split, cfg.streaming,
                            cfg.random_flip, seed=cfg.seed)
    streaming = isinstance(dataset, IterableDataset)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=not streaming, num_workers=cfg.num_workers,
                        collate_fn=collate, drop_last=False)
    preview, val_batches = load_validation(cfg, dataset)

    vae = load_pretrained_vae(cfg.init_from) if cfg.init_from else build_vae(cfg.model)
    if cfg.train_decoder_only:  # the sd-vae-ft-mse recipe: latents of the source VAE stay valid
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:  # SD3 / FLUX VAEs have none
            vae.quant_conv.requires_grad_(False)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    module = VAETrainingForward(vae.train(), cfg.learn_logvar, cfg.logvar_init)
    lpips_model = build_lpips(cfg.lpips_vgg_weights) if cfg.perceptual_weight > 0 else None
    criterion = AutoencoderLoss(cfg.rec_loss, cfg.perceptual_weight, cfg.kl_weight, lpips_model).to(accelerator.device)
    params = [p for p in module.parameters() if p.requires_grad]  # logvar included when learned
    # LDM: base LR x processes x batch x accumulation, for the autoencoder and the discriminator alike
    lr_scale = accelerator.num_processes * cfg.batch_size * cfg.gradient_accumulation_steps if cfg.scale_lr else 1
    base_lr = cfg.learning_rate * lr_scale

    def lr_at(step: int) -> float:  # linear warm-up, then constant (a pure function of the step, so resume is exact)
        return base_lr * min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else base_lr

    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # lr_at(0), not base_lr: the first step is the first of the warm-up
    optimizer = optimizer_class(params, lr=lr_at(0), betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay)
    model, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    vae = accelerator.unwrap_model(model).vae
    last_layer = vae.decoder.conv_out.weight  # where LDM balances the adversarial gradient against the nll's
    disc = disc_optimizer = None
    if cfg.disc_weight > 0:
        disc = build_discriminator(cfg, accelerator)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=(cfg.disc_learning_rate or cfg.learning_rate) * lr_scale,
                                          betas=(0.5, 0.9))
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    vae_trained = [p for p in vae.parameters() if p.requires_grad]
    # LDM's clamp of the adaptive weight, moved to our loss scale (ours is LDM's / 3*H*W)
    max_adaptive_weight = 1e4 / (3 * cfg.resolution**2)

    step, epoch, batch_in_epoch, skipped = 0, 0, 0, set()  # skipped: names of unreadable files
    nonfinite_in_a_row, nonfinite_steps = 0, 0
    if cfg.resume:
        checkpoint = find_checkpoint(out, cfg.resume)
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        skipped, nonfinite_steps = set(state["skipped"]), state["nonfinite_steps"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    ema = None
    if cfg.ema_decay > 0:  # over the trained parameters only: a frozen encoder stays bit-identical
        # made after the resume, so EMA turned on at resume averages from the resumed weights
        ema = EMAModel(vae_trained, decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup)
        ema.to(accelerator.device)
        if cfg.resume and "ema" in state:
            load_ema(ema, checkpoint, state["ema"], accelerator.device)
    if main:
        set_aside_later_checkpoints(out, step, accelerator.print)  # a new run's or an earlier step's: not mixed in
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        save_config(cfg, out / "config.yaml")
    accelerator.init_trackers("sdvae", config={k: v if v is not None else "" for k, v in
                                               dataclasses.asdict(cfg).items()})
    if lpips_model is None:
        accelerator.print("perceptual loss: off (perceptual_weight=0)")

    at_start = evaluate(vae, val_batches, accelerator.device) if (
        val_batches and main and not cfg.resume) else None  # the baseline the final scores are compared with
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not main, desc="train", unit="step")
    running: dict = {}
    counts: dict[str, int] = {}  # per key: grad_norm comes once per optimizer step, d_loss only after disc_start
    first_logged: dict[str, float] = {}
    last_logged: dict[str, float] = {}
    start, images_seen, stop = time.time(), 0, False
    window_start, window_images = start, 0  # images/s in the logs is over the last log window
    while step < cfg.max_steps and not stop:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
        whole_epoch, readable = batch_in_epoch == 0, False
        for batch in batches:
            batch_in_epoch += 1
            report_skipped(batch["skipped"], skipped, cfg.skip_log_limit)
            x = batch["pixel_values"]
            if not all_processes_agree(accelerator, x.numel() > 0):
                continue  # every file in this batch was unreadable; DDP needs all processes to skip together
            readable = True

            use_disc = disc is not None and step >= cfg.disc_start  # before disc_start it costs nothing
            with accelerator.accumulate(model, *([disc] if disc is not None else [])):
                noise_seed = seed_for(cfg.seed, accelerator.process_index, step, batch_in_epoch, epoch)
                reconstruction, kl, logvar = model(x, noise_seed if cfg.sample_posterior else None)
                with accelerator.autocast():
                    loss, nll, logs = criterion(x, reconstruction, kl, logvar)
                    if use_disc:
                        adversarial, adv_logs = generator_term(accelerator.unwrap_model(disc), reconstruction, nll,
                                                               last_layer, cfg.disc_weight, max_adaptive_weight)
                        loss = loss + adversarial
                        logs.update(adv_logs)
                finite = all_processes_agree(accelerator, bool(torch.isfinite(loss)))
                accelerator.backward(loss)  # also when not finite: DDP expects every forward to get its backward
                if finite:
                    if accelerator.sync_gradients:  # the norm is logged also when clipping is off
                        logs["grad_norm"] = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
                    optimizer.step()
                else:  # drop the window's gradients now: between sync steps optimizer.zero_grad does nothing,
                    model.zero_grad(set_to_none=True)  # and the NaNs would reach the window's optimizer step
                optimizer.zero_grad(set_to_none=True)
                if use_disc and finite:
                    d_loss, d_logs = discriminator_term(disc, x, reconstruction, cfg.disc_loss)
                    accelerator.backward(d_loss)
                    disc_optimizer.step()
                    disc_optimizer.zero_grad(set_to_none=True)
                    logs.update(d_logs)
            if not finite:
                nonfinite_in_a_row, nonfinite_steps = nonfinite_in_a_row + 1, nonfinite_steps + 1
                log.warning("non-finite loss at step %d: step skipped (%d in a row)", step, nonfinite_in_a_row)
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    last = (completed_checkpoints(out) or ["none written yet"])[-1]
                    raise RuntimeError(f"{nonfinite_in_a_row} non-finite losses in a row at step {step}: stopping. "
                                       f"Last good checkpoint: {last}. Try a lower learning_rate, "
                                       f"mixed_precision=no or bf16, or max_grad_norm.")
                continue
            nonfinite_in_a_row = 0
            images_seen += x.shape[0] * accelerator.num_processes
            window_images += x.shape[0] * accelerator.num_processes
            for k, v in logs.items():  # summed on the device: no host sync until a log line is written
                running[k] = running.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
                counts[k] = counts.get(k, 0) + 1
            if not accelerator.sync_gradients:
                continue

            step += 1
            if ema is not None:
                ema.step(vae_trained)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            elapsed = time.time() - start
            stop = step >= cfg.max_steps or out_of_time(accelerator, elapsed, cfg.max_minutes)
            progress.update(1)
            if step % cfg.log_every == 0 or stop:
                means = {k: float(v) / counts[k] for k, v in running.items()}
                now = time.time()
                means.update(lr=optimizer.param_groups[0]["lr"], images_per_sec=window_images / (now - window_start),
                             skipped_files=len(skipped), nonfinite_steps=nonfinite_steps, epoch=epoch)
                if ema is not None:
                    means["ema_decay"] = ema.cur_decay_value
                accelerator.log({f"train/{k}": v for k, v in means.items()}, step=step)
                progress.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['images_per_sec']:.3g}")
                running, counts, last_logged = {}, {}, means
                window_start, window_images = now, 0
                first_logged = first_logged or means
            if preview is not None and main and (step % cfg.sample_every == 0 or stop):
                write_preview(accelerator, model, preview, out, step)
            if step % cfg.checkpoint_every == 0 or stop:
                save_checkpoint(accelerator, out, step, cfg.checkpoints_total_limit,
                                dict(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, skipped=sorted(skipped),
                                     nonfinite_steps=nonfinite_steps), ema)
            if stop:
                break
        else:
            if whole_epoch and not readable:  # else the next epoch would be as empty, for ever
                raise ValueError(f"none of the {len(skipped)} images in {cfg.data} could be read (see the warnings "
                                 f"above for why)")
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()

    elapsed = time.time() - start
    accelerator.wait_for_everyone()
    metrics = {}
    if main:
        exported = "trained"
        if ema is not None and cfg.export_ema:
            ema.copy_to(vae_trained)
            exported = "ema"
        vae.save_pretrained(out / "vae", safe_serialization=True)
        metrics = dict(steps=step, epochs=epoch, wall_seconds=round(elapsed, 1),
                       images_per_sec=round(images_seen / max(elapsed, 1e-9), 2), images_seen=images_seen,
                       skipped_files=len(skipped), skipped_file_names=sorted(skipped)[:1000],
                       nonfinite_steps=nonfinite_steps, perceptual_loss=lpips_model is not None,
                       discriminator=disc is not None, exported_weights=exported,
                       processes=accelerator.num_processes, mixed_precision=cfg.mixed_precision,
                       first_logged=first_logged, last_logged=last_logged, export=str(out / "vae"))
        if val_batches:  # scored with the exported weights
            metrics["validation"] = evaluate(vae, val_batches, accelerator.device)
            if at_start:
                metrics["validation_at_start"] = at_start
        if preview is not None:
            vae.eval()
            comparison_grid(preview, reconstruct(vae, preview.to(accelerator.device))).save(out / "reconstructions.png")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    accelerator.end_training()
    return metrics


def load_validation(cfg: TrainConfig, train_dataset):
    """Fixed centre crops: `val_data` is scored with PSNR/SSIM; the preview grids show `preview_images` of them
    (of the first training images when there is no `val_data`)."""
    if cfg.val_data:
        dataset = build_dataset(cfg.val_data, cfg.resolution, cfg.image_column, cfg.val_split,
                                random_flip=False, random_crop=False)
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
def evaluate(vae, batches, device) -> dict:
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
def write_preview(accelerator, model, preview, out: Path, step: int):
    vae = accelerator.unwrap_model(model).vae
    vae.eval()
    reconstruction = reconstruct(vae, preview.to(accelerator.device))
    vae.train()
    grid = comparison_grid(preview, reconstruction)
    grid.save(out / "samples" / f"step-{step:07d}.png")
    psnr = summarise(score(preview, reconstruction))["psnr_mean"]
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
    if norm == "batch" and several:
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)  # statistics over the global batch
    return disc


def out_of_time(accelerator, elapsed: float, max_minutes: float) -> bool:
    if max_minutes <= 0:
        return False
    return not all_processes_agree(accelerator, elapsed < max_minutes * 60)  # all stop on the same step


def all_processes_agree(accelerator, flag: bool) -> bool:
    """True only if `flag` is true on every process."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() == 0)


def report_skipped(batch_skipped, skipped: set, limit: int) -> None:
    for name, error in batch_skipped:
        if name in skipped:
            continue
        skipped.add(name)
        if len(skipped) <= limit:
            log.warning("skipped unreadable image %s (%s)", name, error)
        elif len(skipped) == limit + 1:
            log.warning("more unreadable images: counting them without naming each (see metrics.json)")


def completed_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders that were fully written (they hold trainer_state.json), oldest first."""
    done = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"not a complete sdvae checkpoint: {path} (no trainer_state.json)")
        return path
    done = completed_checkpoints(out)
    if not done:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {out}")
    return done[-1]


def set_aside_later_checkpoints(out: Path, step: int, say) -> None:
    """A new run, or a resume from an earlier step, starts a new timeline: the later checkpoints of the old one
    are renamed, not deleted, so that pruning cannot remove the new ones in their favour nor `resume=latest`
    pick them."""
    for later in completed_checkpoints(out):
        if int(later.name.split("-")[1]) > step:
            aside = later.with_name(f"superseded-{later.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(later, aside)
            say(f"{later} belongs to an earlier run (it is past step {step}, where this one starts): "
                f"moved to {aside}")


def save_checkpoint(accelerator, out: Path, step: int, keep: int, state: dict, ema=None):
    """Write into a temporary folder, then rename: a run killed mid-write leaves no checkpoint-N to resume from."""
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema_state = ema.state_dict()
            shadow = ema_state.pop("shadow_params")
            save_file({str(i): t.detach().contiguous().cpu() for i, t in enumerate(shadow)}, tmp / "ema.safetensors")
            state = {**state, "ema": ema_state}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in completed_checkpoints(out)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_ema(ema, checkpoint: Path, ema_state: dict, device) -> None:
    tensors = load_file(str(checkpoint / "ema.safetensors"))
    ema.load_state_dict({**ema_state, "shadow_params": [tensors[str(i)] for i in range(len(tensors))]})
    ema.to(device)
