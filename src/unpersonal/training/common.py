"""The pieces under every trainer: weights copies, checkpoint files, SIGTERM, the cosine schedule.

Each `fit-*` stage keeps its resumable state in `run/.work/<stage>/`; `training.loop` is the
scaffold that saves and resumes it.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unpersonal.rundir import write_atomic


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's weights, safe to keep while training goes on."""
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable training state atomically (a kill mid-write leaves the old one)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_state(path: Path) -> dict[str, Any] | None:
    """The state `save_state` wrote, or None when there is none (a fresh start)."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def install_sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler's kill, accelerate's shutdown) saves state like Ctrl-C does."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if os.name == "posix":
        signal.signal(signal.SIGTERM, handler)


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float,
            backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward) -> None:
    """One optimiser step on `loss` at learning rate `lr` (every parameter group), the lines each
    trainer's step ends with; `backward` is accelerate's under several processes."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    optimizer.step()


def cosine_lr(step: int, total_steps: int, peak: float, warmup_steps: int = 0) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from `peak` to 0 at `total_steps`.

    `step` is the 0-based index of the step about to be taken, so the first step already moves.
    The angle is rounded as each trainer always did: with warm-up pi times the share of the
    decay done (the embedder), without it pi * step / total_steps (the classifier, re-ID). The
    two differ in the last bit of about one learning rate in five, which would change the
    logged rates and, rarely, the published weights of runs made before.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if warmup_steps:
        angle = math.pi * ((step - warmup_steps) / max(1, total_steps - warmup_steps))
    else:
        angle = math.pi * min(step, total_steps) / total_steps
    return peak * 0.5 * (1 + math.cos(angle))
