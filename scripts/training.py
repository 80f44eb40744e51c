"""What the two training programs share (the tiny model's `train_tiny`, the demo's `train_smolvlm`).

Set-up of a run (threads and seeds), the learning-rate schedule (linear warmup, then cosine decay to a
floor), and atomic writes of the run's small files (progress, logs, configs), so an interrupted run
resumes from a consistent checkpoint.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from sinkscope.runfolder import atomic_write_text

__all__ = ["start_run", "warmup_cosine_lr", "optimizer_step", "atomic_write_text", "atomic_write_json"]


def start_run(out: str | Path, seed: int, threads: int = 0, seed_numpy: bool = False) -> Path:
    """Create the output folder, cap torch's threads (0: torch's default) and seed the generators."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    if seed_numpy:
        np.random.seed(seed)
    return out


def warmup_cosine_lr(lr: float, warmup: int, steps: int, step: int, floor: float) -> float:
    """Learning rate at `step` of a stage: linear warmup over `warmup` steps, then cosine decay from `lr` to
    `floor * lr` at the stage's last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def optimizer_step(optimizer, loss: torch.Tensor, params, grad_clip: float, progress: dict) -> None:
    """One step on `loss` (gradients clipped to `grad_clip`), counted in `progress` (step in stage, global step)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    progress["step_in_stage"] += 1
    progress["global_step"] += 1


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=1))
