"""What every trainer shares: seeded per-step randomness, resumable state, time budgets, devices.

Each `fit-*` stage keeps its resumable state in `run/.work/<stage>/` and draws everything random
of step t from a generator seeded by (seed, t, rank), so a resumed run repeats exactly what an
uninterrupted one would have done without saving any RNG state.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unpersonal.errors import Interrupted
from unpersonal.rundir import write_atomic


def pick_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 32-bit seed for step `step` of process `rank`: a pure function, so resumes repeat it."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def step_generator(seed: int, step: int, device: torch.device | str = "cpu",
                   rank: int = 0) -> torch.Generator:
    return torch.Generator(device).manual_seed(step_seed(seed, step, rank))


def batch_indices(seed: int, step: int, rank: int, local_batch: int, world: int, n: int
                  ) -> torch.Tensor:
    """This process's images for `step`: epochs of seeded permutations, split across processes.

    Every image is seen once per epoch, and the indices are a pure function of the arguments.
    """
    first = step * local_batch * world + rank * local_batch
    positions = np.arange(first, first + local_batch)
    out = np.empty(local_batch, dtype=np.int64)
    for epoch in np.unique(positions // n):
        permutation = np.random.default_rng([seed, int(epoch)]).permutation(n)
        in_epoch = positions // n == epoch
        out[in_epoch] = permutation[positions[in_epoch] % n]
    return torch.from_numpy(out)


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
