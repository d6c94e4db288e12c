"""What every trainer shares: resumable state, time budgets, interruption.

Each `fit-*` stage keeps its resumable state in `run/.work/<stage>/` and draws everything random
of step t from `unpersonal.torch_utils`' generators seeded by (seed, t, rank), so a resumed run
repeats exactly what an uninterrupted one would have done without saving any RNG state.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import torch

from unpersonal.errors import Interrupted
from unpersonal.rundir import write_atomic


def out_of_time(max_minutes: float | None, elapsed_before: float, started: float) -> bool:
    """True once a wall-time budget (minutes, over all resumed sessions) is spent."""
    if max_minutes is None:
        return False
    return elapsed_before + time.perf_counter() - started >= max_minutes * 60


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


def interrupted(stage: str, step: int, total: int) -> Interrupted:
    """The error a trainer raises after saving its state on Ctrl-C or SIGTERM (exit 130)."""
    return Interrupted(f"{stage} interrupted at step {step} of {total}; state saved, rerun the "
                       "same command to resume")
