"""The training step's safety net: a step whose loss, gradient or update is not finite is skipped and undone (the
weights and optimiser state copied back), and counted until too many in a row stop the run; SIGINT / SIGTERM stop
it after the current step, with a checkpoint."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from .checkpoints import completed_checkpoints
from .processes import all_processes_agree

log = logging.getLogger("sdvae")


class StopSignals:
    """The first SIGINT or SIGTERM asks the loop to stop after the current optimiser step, with a checkpoint.
    Another one exits at once, unless it comes within a second of the first: launchers (torchrun) forward the
    signal the terminal already sent to every process."""

    def __init__(self, announce: bool = True):
        self.signum, self.first_at, self.previous, self.announce = 0, 0.0, {}, announce

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if not self.signum:
            self.signum, self.first_at = signum, time.monotonic()
            if self.announce:
                os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                            f"(again to exit at once)\n".encode())
        elif time.monotonic() - self.first_at > 1.0:
            os.write(2, f"{signal.Signals(signum).name} again: exiting without a checkpoint\n".encode())
            os._exit(128 + signum)



def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers: a Ctrl-C reaches the whole process group, and a worker that died of it would end the
    step the main process is finishing. The main process stops them when it is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)



def nonfinite_problem(accelerator, losses: list, grad_norm: torch.Tensor) -> str | None:
    """None when every process's losses and gradient norm are finite, found with one wait for the device in all;
    else which of them was not. (fp16's scaler skips steps with non-finite gradients itself, and lowers its scale.)"""
    checked = losses + ([grad_norm] if accelerator.scaler is None else [])
    if all_processes_agree(accelerator, bool(torch.isfinite(torch.stack([t.float() for t in checked])).all())):
        return None
    return "gradient" if all_processes_agree(accelerator, bool(torch.isfinite(torch.stack(losses)).all())) else "loss"



def count_nonfinite(run, problem: str) -> None:
    state = run.state
    state.nonfinite_steps, state.nonfinite_in_a_row = state.nonfinite_steps + 1, state.nonfinite_in_a_row + 1
    log.warning("non-finite %s at step %d: step skipped (%d in a row)", problem, state.step, state.nonfinite_in_a_row)
    if state.nonfinite_in_a_row >= run.cfg.max_nonfinite_steps:
        done = (completed_checkpoints(run.out) or ["none written yet"])[-1]
        raise RuntimeError(f"{state.nonfinite_in_a_row} non-finite steps in a row at step {state.step} (last: "
                           f"{problem}): stopping. Last good checkpoint: {done}. Try a lower learning_rate, "
                           f"mixed_precision=no or bf16, or max_grad_norm.")
    return None



class StepGuard:
    """Undo for an optimiser step: the weights and optimiser state from before it are copied into kept buffers,
    and back when the update left a weight NaN or infinite (an infinite learning rate, an overflow)."""

    def __init__(self, params: list, optimizers: list):
        self.params, self.optimizers, self.saved = params, optimizers, None

    def _state(self) -> list[tuple[dict, str]]:
        return [(s, k) for o in self.optimizers for s in o.state.values() for k, v in s.items() if torch.is_tensor(v)]

    def save(self) -> None:
        entries = self._state()
        tensors = [p.detach() for p in self.params] + [s[k] for s, k in entries]
        if self.saved is None or len(self.saved) != len(tensors):  # the optimiser's state appears on its first step
            self.saved = [t.clone() for t in tensors]
        else:
            copy_all(self.saved, tensors)
        self.had_state = [{p: set(s) for p, s in o.state.items()} for o in self.optimizers]

    def finite(self) -> bool:
        """Exact and cheap: a NaN or inf makes its tensor's 2-norm non-finite, so finite norms settle it with one
        fused reduction; only a non-finite norm (which huge finite weights can also give) looks element-wise."""
        tensors = [p.detach() for p in self.params]
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
            return True
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def restore(self) -> None:
        for optimizer, had in zip(self.optimizers, self.had_state):
            for p, state in list(optimizer.state.items()):  # state the failed step created goes
                if p not in had:
                    del optimizer.state[p]
                for key in set(state) - had.get(p, set()):
                    del state[key]
        entries = self._state()
        copy_all([p.detach() for p in self.params] + [s[k] for s, k in entries], self.saved)



def copy_all(destinations: list, sources: list) -> None:
    """One fused copy per device and dtype (Adam's step counters stay on the CPU when the weights are on a GPU)."""
    groups: dict = {}
    for d, s in zip(destinations, sources):
        group = groups.setdefault((d.device, d.dtype, s.device), ([], []))
        group[0].append(d)
        group[1].append(s)
    for d, s in groups.values():
        torch._foreach_copy_(d, s)
