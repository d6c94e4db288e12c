"""The training scaffold the four trainers share, so that each keeps only its model, loss and step.

A trainer reads top to bottom (nanoGPT style):

    loop = TrainingLoop(task_name, checkpoint, settings.steps,
                        checkpoint_every=settings.checkpoint_every,
                        max_minutes=settings.max_minutes, images_per_step=batch)
    loop.resume(model=net, optimizer=optimizer)     # loads them from the checkpoint, if any
    batches = SeededBatches(config.seed, rows=n, batch=batch, device=device)
    with loop.running("training X"):                # Ctrl-C / SIGTERM: save, then `Interrupted`
        for step in loop.steps():                   # budget, clock, early stop; checkpoints
            rows, generator = batches.draw(step)
            loss = ...
            optimizer.step()
            loop.record(loss.item(), lr=lr)          # the next log row's figures

Everything random of step t comes from (seed, t, rank) (`SeededBatches`), and the checkpoint holds
the weights, the optimiser, the step, the log and the losses since its last row, so a resumed run
repeats an uninterrupted one bit for bit without saving any RNG state. (Not quite after a Ctrl-C
that lands after a step's forward pass: what the forward pass changes in place, BatchNorm
statistics or EDM2's weight normalisation, is saved half-done and done again on resuming, which
moves the last bits.)
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from unpersonal.errors import Interrupted
from unpersonal.progress import LiveBar, console
from unpersonal.torch_utils import batch_indices, step_generator
from unpersonal.training.common import cpu_state, load_state, save_state

LOG_EVERY = 10  # steps between log rows
BAR_HIDDEN = ("step", "epoch", "elapsed_s")  # row fields the bar does not repeat


class Stateful(Protocol):
    """What the checkpoint holds: anything with a state dict (modules, optimisers, `BestSoFar`)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@dataclass(frozen=True)
class SeededBatches:
    """Which rows and which random stream step t uses: a pure function of (seed, t, rank).

    Rows come in seeded epochs split across `world` processes (`batch_indices`), so a resumed
    run, or one on another number of processes, draws what an uninterrupted one would have.
    """

    seed: int
    rows: int  # how many to draw from (images, or patients)
    batch: int  # per process
    device: torch.device
    rank: int = 0
    world: int = 1

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Generator]:
        """This process's rows for `step` and the generator of everything else random in it."""
        return (batch_indices(self.seed, step, self.rank, self.batch, self.world, self.rows),
                step_generator(self.seed, step, self.device, self.rank))


class Snapshot:
    """Weights copied at one moment of training (the diffusion model's autoguidance guide);
    a checkpoint part, so a resumed run keeps the copy an earlier session took."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] | None = None

    def take(self, module: torch.nn.Module) -> None:
        self.weights = cpu_state(module)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.weights

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        self.weights = state


class BestSoFar:
    """The weights of the best validation so far, for trainers that stop early.

    `stale` counts validations since the score last improved: a trainer stops at its patience.
    """

    def __init__(self) -> None:
        self.score = -math.inf
        self.at = 0  # the step or epoch the kept weights are from
        self.weights: dict[str, torch.Tensor] | None = None
        self.stale = 0

    def offer(self, score: float, at: int, module: torch.nn.Module) -> bool:
        """Keep `module`'s weights when `score` beats the best so far; whether it did."""
        if score > self.score:
            self.score = score
            self.keep(at, module)
            return True
        self.stale += 1
        return False

    def keep(self, at: int, module: torch.nn.Module) -> None:
        """Keep these weights whatever the score (without validation the latest are the best)."""
        self.at, self.weights, self.stale = at, cpu_state(module), 0

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.score, "at": self.at, "weights": self.weights, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.score, self.at, self.weights, self.stale = (
            state["score"], state["at"], state["weights"], state["stale"])


class TrainingLoop:
    """Resume, checkpoints, Ctrl-C / SIGTERM, the time budget, the progress bar and the log of
    one training, which the trainers would otherwise each write again.

    `stage` names the stage actually running (fit-embedder, or the audit's audit-embedder) in
    the resume and interruption messages. Without a `checkpoint` nothing is saved and Ctrl-C
    stays a plain KeyboardInterrupt (the evaluation's classifiers). Only the `main_process`
    saves, prints and shows the bar (accelerate's other processes train alongside it).
    """

    def __init__(self, stage: str, checkpoint: Path | None, steps: int, *,
                 checkpoint_every: int, max_minutes: float | None,
                 log_every: int | None = LOG_EVERY, images_per_step: int | None = None,
                 epoch_steps: int | None = None, main_process: bool = True) -> None:
        self.stage, self.checkpoint, self.total = stage, checkpoint, steps
        self.checkpoint_every, self.max_minutes = checkpoint_every, max_minutes
        self.log_every = log_every  # None: the trainer writes its own rows (`append_row`)
        self.images_per_step = images_per_step  # set: rows carry images/s and elapsed seconds
        self.epoch_steps = epoch_steps  # set: messages say the epoch too
        self.main_process = main_process
        self.step = 0
        self.log: list[dict[str, Any]] = []
        self.window: list[float] = []  # losses since the last log row
        self.timed_out = False
        self._parts: dict[str, Stateful] = {}
        self._elapsed_before = 0.0
        self._started = self._window_started = time.perf_counter()
        self._figures: dict[str, Any] = {}
        self._row_now = False
        self._shown: dict[str, Any] = {}
        self._bar: LiveBar | None = None

    # -- resuming and saving

    def resume(self, **parts: Stateful) -> bool:
        """Register what the checkpoint holds and load it from there when one exists.

        Returns whether training resumes (False: a fresh start). Call it before anything moves
        or wraps the parts (accelerate's `prepare`), as loading replaces their state.
        """
        self._parts = parts
        state = load_state(self.checkpoint) if self.checkpoint is not None else None
        if state is not None:
            for name, part in parts.items():
                part.load_state_dict(state[name])
            self.step, self.log, self.window = state["step"], state["log"], state["window"]
            self._elapsed_before = state["elapsed_s"]
            if self.main_process:
                console.print(f"{self.stage}: resuming at {self._where()}")
        self._started = self._window_started = time.perf_counter()
        return state is not None

    def save(self) -> None:
        """Write the checkpoint (atomically: a kill mid-write leaves the previous one)."""
        if self.checkpoint is None or not self.main_process:
            return
        state = {name: part.state_dict() for name, part in self._parts.items()}
        save_state(self.checkpoint, {**state, "step": self.step, "log": self.log,
                                     "window": self.window, "elapsed_s": self.elapsed()})

    def elapsed(self) -> float:
        """Wall seconds of training over every session of this run."""
        return self._elapsed_before + time.perf_counter() - self._started

    def out_of_time(self) -> bool:
        """True once the wall-time budget (over all resumed sessions) is spent."""
        return self.max_minutes is not None and self.elapsed() >= self.max_minutes * 60

    # -- running

    @contextmanager
    def running(self, description: str | None, print_every: int | None = None
                ) -> Iterator[None]:
        """The bar (`description`; None: none), and the final save when the block ends.

        Ctrl-C, or SIGTERM (which the CLI turns into Ctrl-C), saves the state and raises
        `Interrupted` (exit code 130): rerunning the same command resumes. Off a terminal the
        bar prints a line every `print_every` steps (default: every tenth log row).
        """
        every = print_every or (self.log_every or 1) * 10
        bar = LiveBar(description or "", self.total, start=self.step, log_every=every,
                      enabled=description is not None and self.main_process)
        try:
            with bar:
                self._bar = bar
                yield
        except KeyboardInterrupt:
            if self.checkpoint is None:
                raise
            self.save()
            raise Interrupted(f"{self.stage} interrupted at {self._where()}; state saved, "
                              "rerun the same command to resume") from None
        finally:
            self._bar = None
        self.save()

    def steps(self, stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
        """The index of each step still to take, until the planned steps are done, the time
        budget is spent (`timed_out`) or `stop()` says so (early stopping).

        After each step: count it, log a row when one is due, move the bar, and save a
        checkpoint every `checkpoint_every` steps.
        """
        while self.step < self.total:
            if self.out_of_time():
                self.timed_out = True
                return
            if stop():
                return
            yield self.step
            self.step += 1
            if self._row_now or (self.log_every is not None and (
                    self.step % self.log_every == 0 or self.step == self.total)):
                self.log_row(**self._figures)
            if self._bar is not None:
                self._bar.update(1)
            if self.step % self.checkpoint_every == 0:
                self.save()

    # -- the log

    def record(self, loss: float, row: bool = False, **figures: Any) -> None:
        """The step's loss, and the figures its log row would carry (a learning rate, a
        validation AUC); `row` logs a row after this step even between `log_every`s."""
        self.window.append(loss)
        self._figures, self._row_now = figures, row

    def mean_loss(self) -> float | str:
        """The mean loss since the last log row ("" when no step was taken since)."""
        return float(np.mean(self.window)) if self.window else ""

    def log_row(self, **figures: Any) -> None:
        """Log the step, the mean loss since the last row and `figures` (with `images_per_step`,
        images/s and elapsed seconds too)."""
        row = {"step": self.step, "loss": self.mean_loss(), **figures}
        if self.images_per_step is not None:
            now = time.perf_counter()
            row["images_per_s"] = (len(self.window) * self.images_per_step
                                   / (now - self._window_started))
            row["elapsed_s"] = self.elapsed()
        self.append_row(row)

    def append_row(self, row: dict[str, Any]) -> None:
        """Log a row as it is (a trainer's own layout, such as the classifier's epochs), start a
        new loss window, and show the row's figures on the bar."""
        self.log.append(row)
        self.window, self._window_started, self._row_now = [], time.perf_counter(), False
        self._shown.update({key: value for key, value in row.items()
                            if key not in BAR_HIDDEN and value != ""})
        if self._bar is not None:
            self._bar.update(0, **self._shown)

    def _where(self) -> str:
        where = f"step {self.step} of {self.total}"
        if self.epoch_steps is not None:
            epochs = math.ceil(self.total / self.epoch_steps)
            # The step about to be taken is in this epoch; after the last step, the last epoch.
            where += f" (epoch {min(self.step // self.epoch_steps + 1, epochs)} of {epochs})"
        return where


def write_log(path: Path, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    """The published training_log.csv: one line per log row, in `fields`' order."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
