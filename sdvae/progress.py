"""A run's bookkeeping on the way: the progress bar and its total, the logged means, the files skipped."""
from __future__ import annotations

import logging
import signal
import time

import torch

from .checkpoints import TrainState

log = logging.getLogger("sdvae")


class LogWindow:
    """Means of the logged values since the last log line, each over the micro-batches that have it (grad_norm
    comes once per optimiser step, d_loss only after disc_start), and images/s over the same time."""

    def __init__(self):
        self.started = self.window_start = time.time()
        self.images_seen, self.first, self.last = 0, {}, {}
        self.sums, self.counts, self.images = {}, {}, 0

    def add(self, logs: list[dict], images: int) -> None:
        for micro_batch in logs:
            for k, v in micro_batch.items():  # summed on the device: no host sync until a log line is written
                self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
                self.counts[k] = self.counts.get(k, 0) + 1
        self.images += images
        self.images_seen += images

    def flush(self, **extra) -> dict:
        now = time.time()
        means = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        means.update(images_per_sec=self.images / max(now - self.window_start, 1e-9), **extra)
        self.first, self.last = self.first or means, means
        self.sums, self.counts, self.images, self.window_start = {}, {}, 0, now
        return means



def write_log(run, window: LogWindow, progress) -> None:
    state = run.state
    means = window.flush(lr=run.optimizer.param_groups[0]["lr"], skipped_files=len(state.skipped),
                         nonfinite_steps=state.nonfinite_steps, epoch=state.epoch)
    if run.ema is not None:
        means["ema_decay"] = run.ema.cur_decay_value
    run.accelerator.log({f"train/{k}": v for k, v in means.items()}, step=state.step)
    progress.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['images_per_sec']:.3g}")



def advance(progress, cfg, state: TrainState, started: float, stop: bool, signum: int = 0) -> None:
    """One step on the bar, whose total is the step the run stops at: max_steps, the last step, or for a
    time-limited run the estimate, which never falls behind while time is left. A run stopped by a signal keeps
    its total: the bar shows how far it got, not 100%."""
    step = progress.n + 1
    if stop and signum:
        progress.set_postfix_str(f"stopped by {signal.Signals(signum).name}", refresh=False)
    elif stop:
        progress.total = step
    elif cfg.max_minutes > 0:
        estimate = max(step + 1, steps_in_time(cfg, step, step - progress.initial, time.time() - started,
                                               state.train_seconds))
        if step >= progress.total or abs(estimate - progress.total) > 0.1 * progress.total:
            progress.total = estimate  # moved only when the rate changed much: a total that jumps every step
    progress.update(1)              # makes the bar's ETA meaningless



def steps_in_time(cfg, step: int, steps_done: int, seconds_here: float, seconds_trained: float) -> int:
    """The step the run will stop at: max_steps, or where max_minutes ends it at this session's rate, whichever
    comes first, so that the progress bar and its ETA tell the truth about a time-limited run. seconds_trained
    counts earlier sessions of a resumed run too."""
    left = max(cfg.max_minutes * 60 - seconds_trained, 0.0)
    expected = step + round(steps_done / max(seconds_here, 1e-9) * left)
    return max(step, min(cfg.max_steps, expected))



def report_skipped(batch_skipped, skipped: set, limit: int) -> None:
    for name, error in batch_skipped:
        if name in skipped:
            continue
        skipped.add(name)
        if len(skipped) <= limit:
            log.warning("skipped unreadable image %s (%s)", name, error)
        elif len(skipped) == limit + 1:
            log.warning("more unreadable images: counting them without naming each (see metrics.json)")
