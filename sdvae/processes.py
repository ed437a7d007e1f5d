"""What every process of a run (torchrun / accelerate launch) must decide together, and how a launch on a machine
without GPUs is told apart."""
from __future__ import annotations

import os

import torch


def several_processes_without_gpu() -> bool:
    """torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: Accelerate forms the gloo group
    only when told it runs on CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()



def all_processes_agree(accelerator, flag: bool) -> bool:
    """True only if `flag` is true on every process."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() == 0)
